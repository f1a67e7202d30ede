"""The recipes on real Fashion-MNIST (Debian's ``dataset-fashion-mnist``; CI installs it)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from trainer_core_plugins.datasets.mnist import FASHION_MNIST, find_files
from trainer_core.cli import make_cli

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(find_files(FASHION_MNIST, FASHION_MNIST.default_roots[:1]) is None,
                       reason="needs real Fashion-MNIST: apt-get install dataset-fashion-mnist (CI installs it)"),
]


def best_val_acc(run: Path) -> float:
    return json.loads((run / "summary.json").read_text())["best"]["val/acc"]["value"]


def test_mlp_recipe_on_full_fashion_mnist(tmp_path: Path) -> None:
    """The seed's MNIST program as a recipe, 2 epochs on all 60,000 images (the seed program reaches about 0.84)."""
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "trainer_core", "run", "--recipe", "fashion-mnist-mlp", "--run-dir", str(run), "--quiet"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 2 and summary["steps"] == 1200
    assert summary["final"]["val/acc"] >= 0.83
    assert any(run.glob("events.out.tfevents.*"))  # the recipe logs to TensorBoard


def test_transfer_beats_training_the_head_from_scratch(tmp_path: Path) -> None:
    """Stage 1 (one epoch on 8 classes), the helper's export of 20 images of each held-out
    class, then the head alone trained on them: on top of the pretrained convnet it must
    beat the same head on a randomly initialised convnet, and the whole convnet trained
    from scratch on the same images."""
    cli = make_cli()
    pretrain = tmp_path / "pretrain"
    result = CliRunner().invoke(cli, ["run", "--recipe", "fashion-mnist-transfer-pretrain", "--epochs", "1",
                                      "--run-dir", str(pretrain), "--quiet"])
    assert result.exit_code == 0, result.output
    spec = importlib.util.spec_from_file_location("fashion_mnist_transfer", RECIPES / "fashion_mnist_transfer.py")
    helper = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(helper)  # type: ignore[union-attr]
    images = tmp_path / "images"
    assert helper.held_out_by(pretrain) == ("pullover", "coat")
    assert helper.export(images, helper.held_out_by(pretrain), per_class=20, val_per_class=200) == {"train": 40, "val": 400}
    accuracy = {}
    runs = {"transfer": [f"model.weights={pretrain}"], "head-from-scratch": ["model.weights=none"],
            "all-from-scratch": ["model.weights=none", "--plugins", "no:freeze"]}
    for label, options in runs.items():
        run = tmp_path / label
        result = CliRunner().invoke(cli, ["run", "--recipe", "fashion-mnist-transfer", "--data-root", str(images),
                                          "-o", *options, "--run-dir", str(run), "--quiet"])
        assert result.exit_code == 0, result.output
        accuracy[label] = best_val_acc(run)
    assert accuracy["transfer"] >= max(accuracy["head-from-scratch"], accuracy["all-from-scratch"]) + 0.05, accuracy
