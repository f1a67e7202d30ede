"""``benchmarks/freeze.py`` runs from a checkout at a tiny size (what it measures
is read by people, never asserted as a time here)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
RATIO = r"[\d.]+x"
SPREAD = r"[\d.]+x \[[\d.]+-[\d.]+\]"  # median [min-max]


@pytest.mark.slow
@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(), reason="needs Debian's dataset-fashion-mnist")
def test_freeze_benchmark_times_both_variants_through_trainer_run() -> None:
    done = subprocess.run([sys.executable, "benchmarks/freeze.py", "--settings", "16x4", "--folder-size", "4,4",
                           "--epochs", "1", "--repeats", "1", "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    frozen = re.search(r"^  frozen recipe as is \(freeze on\) +([\d.]+) / ([\d.]+) +freeze: 1,026 trainable", out, re.MULTILINE)
    whole = re.search(r"^  whole  --plugins no:freeze +([\d.]+) / ([\d.]+) *$", out, re.MULTILINE)
    assert frozen and whole, out
    for row in (frozen, whole):  # a whole epoch holds its training
        assert 0 < float(row[2]) <= float(row[1])
    assert re.search(rf"^  ratio  first epoch, train\+val {RATIO}; first epoch, training alone {RATIO}$", out, re.MULTILINE), out
    assert re.search(rf"^  16 px, batch 4: first epoch, train\+val {SPREAD}; "
                     rf"first epoch, training alone {SPREAD}$", out, re.MULTILINE), out
