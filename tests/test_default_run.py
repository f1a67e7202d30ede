"""`trainer run` with no options: the offline default job on real digits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_core.config import load_config


@pytest.mark.slow
def test_default_run_reaches_97_percent_and_writes_its_folder(tmp_path):
    trainer = Path(sys.executable).parent / "trainer"
    result = subprocess.run([str(trainer), "run"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("smallcnn-digits-")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["device"] == "cpu"
    assert summary["final"]["val/acc"] >= 0.97
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 16))
    assert load_config(run / "config.toml").dataset == "digits"
    # Not a terminal: plain lines, one per epoch, and the final result.
    lines = result.stdout.splitlines()
    assert lines[0].startswith("training smallcnn on digits: 1437 train / 360 validation samples")
    assert sum(line.startswith("epoch ") for line in lines) == 15 and "\r" not in result.stdout
    assert lines[-2].startswith("done in ") and lines[-1] == f"run folder: runs/{run.name}"
