"""Tests written only with trainer-core's public API and its testing kit.

Run them after installing the package: ``pip install -e '.[test]' && pytest``.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_core import RunConfig, UsageError, build_run, load_checkpoint
from trainer_core.testing import run_tiny
from trainer_csv_logger import CsvLogger


def read(path: Path, delimiter: str = ",") -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter=delimiter))


def started(plugin: CsvLogger, tmp_path: Path):  # noqa: ANN201
    """A real, unstarted trainer with a run folder, and the plugin's on_fit_start called."""
    trainer = run_tiny(fit=False, run_dir=tmp_path / "run")
    plugin.on_fit_start(trainer=trainer)
    return trainer


# -- hooks called directly ------------------------------------------------------


def test_rows_follow_evaluations_and_new_metrics_add_columns(tmp_path: Path) -> None:
    plugin = CsvLogger()
    trainer = started(plugin, tmp_path)
    plugin.on_eval(trainer=trainer, metrics={"epoch": 1, "step": 3, "val/loss": 0.5, "val/acc": 0.75})
    plugin.on_eval(trainer=trainer, metrics={"epoch": 2, "step": 6, "val/loss": 0.25, "val/acc": 1.0, "val/f1": 0.9})
    rows = read(tmp_path / "run" / "metrics.csv")
    assert list(rows[0]) == ["epoch", "step", "val/loss", "val/acc", "val/f1"]
    assert rows[0] == {"epoch": "1", "step": "3", "val/loss": "0.5", "val/acc": "0.75", "val/f1": ""}
    assert rows[1]["val/f1"] == "0.9"


def test_floats_keep_full_precision_and_nan(tmp_path: Path) -> None:
    plugin = CsvLogger()
    trainer = started(plugin, tmp_path)
    plugin.on_eval(trainer=trainer, metrics={"epoch": 1, "step": 1, "val/loss": 1 / 3, "val/acc": float("nan")})
    row = read(tmp_path / "run" / "metrics.csv")[0]
    assert float(row["val/loss"]) == 1 / 3 and row["val/acc"] == "nan"


def test_columns_and_delimiter_options(tmp_path: Path) -> None:
    plugin = CsvLogger(filename="acc.csv", columns=["val/acc"], delimiter=";")
    trainer = started(plugin, tmp_path)
    plugin.on_eval(trainer=trainer, metrics={"epoch": 1, "step": 3, "val/loss": 0.5, "val/acc": 0.75})
    assert (tmp_path / "run" / "acc.csv").read_text() == "epoch;step;val/acc\n1;3;0.75\n"


def test_a_column_that_is_not_a_metric_is_a_usage_error(tmp_path: Path) -> None:
    plugin = CsvLogger(columns=["val/f1"])
    trainer = started(plugin, tmp_path)
    with pytest.raises(UsageError, match="no metric val/f1 in this run; available: val/loss, val/acc"):
        plugin.on_eval(trainer=trainer, metrics={"epoch": 1, "step": 3, "val/loss": 0.5, "val/acc": 0.75})


@pytest.mark.parametrize(("options", "message"), [({"delimiter": "::"}, "one character"), ({"filename": ""}, "not be empty")])
def test_bad_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CsvLogger(**options)


def test_a_run_without_a_folder_needs_an_absolute_path(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="absolute"):
        CsvLogger().on_fit_start(trainer=run_tiny(fit=False))
    plugin = CsvLogger(filename=str(tmp_path / "elsewhere.csv"))
    run_tiny({"csv-logger": plugin}, epochs=2)
    assert [row["epoch"] for row in read(tmp_path / "elsewhere.csv")] == ["1", "2"]


# -- real runs --------------------------------------------------------------------


def test_real_run_writes_the_same_numbers_as_metrics_jsonl(tmp_path: Path) -> None:
    run_tiny({"csv-logger": CsvLogger()}, epochs=3, run_dir=tmp_path / "run")
    expected = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = read(tmp_path / "run" / "metrics.csv")
    assert len(rows) == 3
    for row, record in zip(rows, expected):
        assert {key: float(value) for key, value in row.items()} == pytest.approx({k: float(v) for k, v in record.items()})


def test_resume_drops_rows_written_after_the_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = RunConfig(dataset="fake", epochs=1, device="cpu", plugins={"csv-logger": {}}, run_dir=str(run))
    first = build_run(config)  # the plugin comes from its entry point, as for a user
    first.fit()
    first.save_checkpoint(tmp_path / "epoch1.pt")
    epoch1 = read(run / "metrics.csv")
    # The killed run had gone on to write a row the checkpoint does not know about.
    with open(run / "metrics.csv", "a") as handle:
        handle.write("2,99,9.9,0.1\n")

    config.epochs = 3
    build_run(config, resume=load_checkpoint(tmp_path / "epoch1.pt"), run_path=run).fit()
    rows = read(run / "metrics.csv")
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert rows[0] == epoch1[0] and "99" not in {row["step"] for row in rows}


def test_the_command_line_lists_and_runs_the_plugin(tmp_path: Path) -> None:
    listed = subprocess.run([sys.executable, "-m", "trainer_core", "plugins"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    row = listed.stdout.split("csv-logger  (trainer-csv-logger)  trainer_csv_logger:CsvLogger\n")[1].splitlines()
    assert row[1].strip() == "hooks: load_plugin_state, on_eval, on_fit_start, plugin_state_dict"
    done = subprocess.run(
        [sys.executable, "-m", "trainer_core", "run", "--dataset", "fake", "--epochs", "2", "--quiet", "--device", "cpu",
         "--run-dir", str(tmp_path / "run"), "--plugins", "csv-logger", "-o", "csv-logger.columns=val/acc"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert [list(row) for row in read(tmp_path / "run" / "metrics.csv")] == [["epoch", "step", "val/acc"]] * 2
