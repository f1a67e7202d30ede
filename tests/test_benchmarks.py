"""The benchmark scripts run from a checkout with one command each (tiny sizes;
what they measure is read by people, never asserted as a time here)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


def run_script(*args: str, timeout: int = 300) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
def test_overhead_checks_equal_weights_then_reports_every_variant() -> None:
    out = run_script("benchmarks/overhead.py", "--cases", "mlp", "--batch-sizes", "4", "--repeats", "2",
                     "--steps", "12", "--each-plugin")
    assert "seed MLP 1x28x28, batch 4, 12 steps an epoch: weights of (a) and (b) identical" in out
    variants = ["a\\+ and its running loss", "b trainer, no plugins", "c trainer, all built-ins", "tensorboard alone",
                "progress alone", "d trainer run's default plugins"]
    for variant in variants:
        rows = re.findall(rf"{variant}\s+([\d.]+)\s+\[[\d.]+-[\d.]+\]\s+[-+][\d.]+ us\s+[-+][\d.]+ %", out)
        assert len(rows) == 2 and all(float(r) > 0 for r in rows), variant  # steady state and whole runs


def test_overhead_refuses_an_unknown_case() -> None:
    done = subprocess.run([sys.executable, "benchmarks/overhead.py", "--cases", "rnn"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "unknown case rnn: choose from cnn, mlp" in done.stderr


@pytest.mark.slow
@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(), reason="needs Debian's dataset-fashion-mnist")
def test_data_benchmark_trains_both_pipelines_on_real_fashion_mnist() -> None:
    out = run_script("benchmarks/data.py", "--epochs", "1")
    accuracies = [float(a) for a in re.findall(r"s/epoch, val acc ([\d.]+)", out)]
    assert len(accuracies) == 2 and all(a > 0.6 for a in accuracies)  # both pipelines learn the real data
    assert re.search(r"ratio \(a\)/\(b\), mean epoch: [\d.]+x faster", out)


def data_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("data_benchmark", ROOT / "benchmarks" / "data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(), reason="needs Debian's dataset-fashion-mnist")
def test_the_sandal_sneaker_folder_holds_real_fashion_mnist_pngs(tmp_path: Path) -> None:
    folder = data_benchmark().sandal_sneaker_folder(tmp_path / "folder", train=6, val=4)
    for split, count in (("train", 6), ("val", 4)):
        files = sorted((folder / split).glob("*/*.png"))
        assert len(files) == count and [f.parent.name for f in files] == ["sandal"] * (count // 2) + ["sneaker"] * (count // 2)
        with Image.open(files[0]) as image:
            assert image.size == (28, 28) and image.mode == "L" and image.getextrema()[1] > 100  # a real picture


@pytest.mark.slow
@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(), reason="needs Debian's dataset-fashion-mnist")
def test_data_benchmark_compares_the_seeds_transfer_program_with_trainer_run() -> None:
    out = run_script("benchmarks/data.py", "--case", "imagefolder", "--sizes", "8", "--epochs", "2", "--folder-size", "8,8",
                     "--threads", "1", timeout=900)  # five programs, three of them trainer processes
    rows = re.findall(r"\(\s*(\w+)\) .*; epochs [\d.]+(?:, [\d.]+)+; first ratio [\d.]+x; "
                      r"later epochs mean [\d.]+ s, ratio [\d.]+x; best val acc [\d.]+", out)
    assert rows == ["s", "m", "t", "t1", "c"], out


def test_startup_benchmark_reports_no_torch_import() -> None:
    out = run_script("benchmarks/startup.py", "--repeats", "1")
    assert re.search(r"trainer --help\s+median [\d.]+ s", out)
    assert out.count("torch imported: no") == 2  # trainer --help and trainer plugins
