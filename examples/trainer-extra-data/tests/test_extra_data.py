"""The ``logreg`` model and the ``npz`` dataset, through their entry points, on real .npz files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from trainer_core import RunConfig, build_run
from trainer_core.cli import make_cli
from trainer_extra_data.datasets import npz
from trainer_extra_data.models import logreg


def images(count: int, seed: int, shape: tuple[int, ...] = (8, 8)) -> tuple[np.ndarray, np.ndarray]:
    """Two learnable classes of uint8 images: dark noise (0) and bright noise (1)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    pixels = rng.integers(0, 120, size=(count, *shape)) + 120 * labels.reshape(-1, *[1] * len(shape))
    return pixels.astype(np.uint8), labels.astype(np.int64)


def test_a_real_run_learns_from_an_npz_file(tmp_path: Path) -> None:
    x_train, y_train = images(80, seed=0)
    x_test, y_test = images(40, seed=1)
    np.savez(tmp_path / "data.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
             class_names=np.array(["dark", "bright"]))
    config = RunConfig(model="logreg", dataset="npz", data_root=str(tmp_path), epochs=5, lr=0.05, device="cpu",
                       plugins={}, run_dir=str(tmp_path / "run"))
    trainer = build_run(config)
    assert list(trainer.data.classes) == ["dark", "bright"] and len(trainer.data.val) == 40
    state = trainer.fit()
    assert state.metrics["val/acc"] >= 0.95


def test_channels_last_colour_images_and_a_seeded_split(tmp_path: Path) -> None:
    x, y = images(50, seed=0, shape=(6, 6, 3))
    np.savez(tmp_path / "colour.npz", x_train=x, y_train=y)
    data = npz(data_root=tmp_path, file="colour.npz", val_fraction=0.2)
    assert data.input_shape == (3, 6, 6) and len(data.mean) == 3
    assert (len(data.train), len(data.val)) == (40, 10)
    assert list(data.classes) == ["0", "1"]
    again = npz(data_root=tmp_path, file="colour.npz", val_fraction=0.2)
    assert (again.val.targets == data.val.targets).all()


def test_logreg_shapes_and_options() -> None:
    import torch

    model = logreg(input_shape=(3, 6, 6), num_classes=4)
    assert model(torch.zeros(2, 3, 6, 6)).shape == (2, 4)
    with pytest.raises(ValueError, match="dropout"):
        logreg(input_shape=(1, 8, 8), num_classes=2, dropout=1.5)


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(make_cli(), ["run", "--model", "logreg", "--dataset", "npz", "--epochs", "1", "-q", *args])
    return result.exit_code, result.output.strip()


def test_missing_and_malformed_files_are_one_line_errors(tmp_path: Path) -> None:
    code, output = run_cli("--data-root", str(tmp_path), "--run-dir", str(tmp_path / "run"))
    assert code == 2 and output.startswith("error: dataset 'npz': ") and "does not exist; give --data-root" in output
    np.savez(tmp_path / "data.npz", x=np.zeros((3, 8, 8)))
    code, output = run_cli("--data-root", str(tmp_path), "--run-dir", str(tmp_path / "run"))
    assert code == 2 and "holds x; expected arrays x_train, y_train" in output
    np.savez(tmp_path / "data.npz", x_train=np.zeros((3, 8, 8)), y_train=np.array([{"a": 1}] * 3, dtype=object))
    code, output = run_cli("--data-root", str(tmp_path), "--run-dir", str(tmp_path / "run"))
    assert code == 2 and "is not a readable .npz file" in output and "pickle" in output.lower()
    np.savez(tmp_path / "data.npz", x_train=np.zeros((4, 8, 8)), y_train=np.arange(4), x_val=np.zeros((0, 8, 8)),
             y_val=np.zeros(0, dtype=np.int64))
    code, output = run_cli("--data-root", str(tmp_path), "--run-dir", str(tmp_path / "run"))
    assert code == 2 and output.count("\n") == 0 and "data.npz: the validation split is empty" in output
    assert not (tmp_path / "run").exists()  # a bad command leaves nothing behind


def test_the_command_line_lists_them_with_their_distribution() -> None:
    for kind, line in (("models", "logreg  (trainer-extra-data)"), ("datasets", "npz  (trainer-extra-data)")):
        done = subprocess.run([sys.executable, "-m", "trainer_core", kind], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and line in done.stdout, done.stdout + done.stderr
