"""The GPU benchmark scripts work, checked on the CPU at tiny sizes (what they
measure is read by people on a GPU machine, never asserted as a time here)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RATE = re.compile(r"^(?P<case>[^:\n]+): (?P<rate>[\d,]+) samples/s  \[", re.MULTILINE)
QUICK_CASES = [
    "seed CNN 3x32x32, batch 16, written by hand",
    "seed CNN 3x32x32, batch 16, eager",
    "seed CNN 3x32x32, batch 16, whole-step CUDA graph",
    "ResNet-18 3x32x32, batch 4, fp32",
    "ResNet-18 3x32x32, batch 4, bf16 + channels-last",
]


def rates(report: str) -> dict[str, float]:
    return {m["case"]: float(m["rate"].replace(",", "")) for m in RATE.finditer(report)}


@pytest.mark.slow
def test_throughput_quick_reports_every_case_on_the_cpu() -> None:
    done = subprocess.run([sys.executable, "benchmarks/throughput.py", "--device", "cpu", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "device cpu" in out and "synthetic random uint8 images" in out and "QUICK MODE" in out
    found = rates(out)
    assert list(found) == QUICK_CASES  # compilation is skipped without --compile-too
    # The graph case runs, eager on a CPU, and says so.
    assert "cuda-graph: the device is cpu, not a CUDA GPU; running eager" in done.stderr
    assert "(seed CNN 3x32x32, batch 16, whole-step CUDA graph: ran eager, as the cuda-graph warning says)" in out
    assert all(math.isfinite(rate) and rate > 0 for rate in found.values()), found
    ratio = re.search(r"^ResNet-18 bf16 \+ channels-last / fp32: ([\d.]+)x", out, re.MULTILINE)
    assert ratio is not None and float(ratio[1]) > 0
    assert re.search(r"^seed CNN eager: [\d,]+ samples/s \(target", out, re.MULTILINE)
    assert re.search(r"^seed CNN eager through the trainer / written by hand: [\d.]+x$", out, re.MULTILINE)


def test_throughput_refuses_an_unknown_case_and_a_missing_device() -> None:
    unknown = subprocess.run([sys.executable, "benchmarks/throughput.py", "--only", "cnn,vgg"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and "--only takes cnn, cnn-more and/or resnet" in unknown.stderr
    if not torch.cuda.is_available():  # the default device, cuda, cannot be had: one line, exit 2
        missing = subprocess.run([sys.executable, "benchmarks/throughput.py", "--quick"], cwd=ROOT,
                                 capture_output=True, text=True, timeout=120)
        assert missing.returncode == 2
        assert missing.stderr.strip().splitlines() == [
            "error: device 'cuda' was asked for but CUDA is not available here; use --device cpu or auto"]


def test_gpu_script_is_valid_bash() -> None:
    done = subprocess.run(["bash", "-n", "benchmarks/gpu.sh"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert os.access(ROOT / "benchmarks" / "gpu.sh", os.X_OK)
