"""The task recipes train for real and beat their baselines, computed here on the same
validation data: diabetes-mlp in full against linear regression's R^2, pydoc-charlm
shortened to one epoch against a unigram count model; and benchmarks/tasks.py
prints its table from real runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from click.testing import CliRunner

from trainer_core_plugins.datasets import pydoc_chars
from trainer_core.cli import make_cli
from trainer_core.config import load_config
from trainer_core.recipes import find_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def run_recipe(name: str, run_dir: Path, *extra: str) -> dict[str, Any]:
    result = CliRunner().invoke(make_cli(), ["run", "--recipe", name, "--run-dir", str(run_dir), "-q", *extra])
    assert result.exit_code == 0, result.output
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["status"] == "completed"
    return summary


def test_diabetes_mlp_beats_linear_regression(baselines: ModuleType, tmp_path: Path) -> None:
    config = load_config(RECIPES / "diabetes-mlp.toml").validate()
    assert find_recipe("diabetes-mlp") == RECIPES / "diabetes-mlp.toml"
    assert (config.model, config.dataset, config.task) == ("mlp", "diabetes", "regression")
    assert config.plugins["checkpoint"] == {}  # defaults: the task's headline val/r2, best weights restored
    # the same split the recipe trains and validates on
    linear = baselines.diabetes_linear_r2(**config.dataset_options)

    summary = run_recipe("diabetes-mlp", tmp_path / "run")
    assert summary["task"] == "regression" and summary["headline"] == "val/r2"
    assert summary["epochs"] == config.epochs
    best, final = summary["best"]["val/r2"], summary["final"]["val/r2"]
    assert best["value"] > linear, (best, linear)
    assert final > linear, (final, linear)  # not only the epoch picked on the validation split
    # the restored weights are the best epoch's, saved by the checkpoint plugin
    saved = list((tmp_path / "run" / "checkpoints").glob("best-*.pt"))
    assert [p.name for p in saved] == [f"best-epoch{best['epoch']:03d}-val_r2-{best['value']:.4f}.pt"]


@pytest.mark.slow
def test_pydoc_charlm_one_epoch_beats_a_unigram_model(baselines: ModuleType, tmp_path: Path) -> None:
    config = load_config(RECIPES / "pydoc-charlm.toml").validate()
    assert find_recipe("pydoc-charlm") == RECIPES / "pydoc-charlm.toml"
    assert (config.model, config.dataset, config.task) == ("tiny-gpt", "pydoc-chars", "language-model")
    assert config.plugins["checkpoint"] == {}  # defaults: val/loss, best weights restored
    block_size = config.dataset_options["block_size"]
    text = pydoc_chars.corpus_text()
    train_text, val_text = pydoc_chars.split_text(text, config.dataset_options.get("val_fraction", 0.1))
    unigram = baselines.ngram_bits_per_char(1, train_text, val_text, pydoc_chars.vocabulary(text), block_size)

    # One epoch over non-overlapping windows (stride 0): a fraction of the recipe's training.
    summary = run_recipe("pydoc-charlm", tmp_path / "run", "--epochs", "1", "-o", "dataset.stride=0")
    assert summary["task"] == "language-model" and summary["epochs"] == 1
    assert summary["steps"] == -(-((len(train_text) - 1) // block_size) // config.batch_size)
    final = summary["final"]
    assert final["val/bits_per_token"] == pytest.approx(final["val/loss"] / 0.6931471805599453)
    assert final["val/bits_per_token"] < unigram, (final, unigram)


@pytest.mark.slow
def test_tasks_benchmark_prints_the_table_from_real_runs() -> None:
    done = subprocess.run([sys.executable, "benchmarks/tasks.py", "--skip-charlm", "--seeds", "0,1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = re.findall(r"^diabetes-mlp\s+(\d)\s+val/r2\s+([-\d.]+) \(ep\s+\d+/\d+\s*\)\s+([-\d.]+)\s+(yes|NO)\s+([\d.]+)\s+"
                      r"[\d.]+/[\d.]+\s+linear regression ([-\d.]+)$", done.stdout, re.MULTILINE)
    assert [r[0] for r in rows] == ["0", "1"], done.stdout
    for _, best, final, beats, wall, linear in rows:
        assert float(wall) > 0 and float(best) >= float(final)
        assert (beats == "yes") == (float(best) > float(linear))
    assert "pydoc-charlm" not in done.stdout.split("recipe ", 1)[1]  # --skip-charlm


def test_tasks_benchmark_refuses_bad_seeds() -> None:
    done = subprocess.run([sys.executable, "benchmarks/tasks.py", "--seeds", "a,b"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--seeds takes comma-separated integers" in done.stderr
