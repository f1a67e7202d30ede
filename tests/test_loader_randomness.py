"""Augmentation randomness does not depend on the number of loader processes
(issue 18, item 7): each sample is read under a random state drawn from the
seed, the epoch and its index, so ``--num-workers 0`` and the default give the
same batches, and the same run."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from trainer_core.cli import make_cli
from trainer_core.data import Batches
from trainer_core_plugins.datasets import imagefolder


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes of textured images (a random crop or flip changes the pixels), a bias of colour apart."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 6)):
        for label, name in enumerate(("left", "right")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 160, (24, 24, 3)) + np.array([80 * label, 0, 80 * (1 - label)])
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


def first_epochs(folder: Path, workers: int) -> list[torch.Tensor]:
    data = imagefolder.load(folder, image_size=16, resize=20)
    batches = Batches(data.train, 4, torch.device("cpu"), shuffle=True, seed=7, mean=data.mean, std=data.std,
                      num_workers=workers)
    return [torch.cat([inputs for inputs, _ in batches.iterate(epoch)]) for epoch in (1, 2)]


def test_loader_processes_do_not_change_the_augmented_batches(folder: Path) -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    in_process = first_epochs(folder, 0)
    assert torch.equal(torch.get_rng_state(), before)  # reading samples leaves the run's random stream alone
    with_workers = first_epochs(folder, 2)
    assert all(torch.equal(a, b) for a, b in zip(in_process, with_workers))
    assert not torch.equal(in_process[0], in_process[1])  # (a new augmentation each epoch)
    # A mid-epoch resume reads the same augmented samples as the run never stopped.
    data = imagefolder.load(folder, image_size=16, resize=20)
    batches = Batches(data.train, 4, torch.device("cpu"), shuffle=True, seed=7, mean=data.mean, std=data.std, num_workers=0)
    assert torch.equal(torch.cat([x for x, _ in batches.iterate(1, start_batch=2)]), in_process[0][8:])


def test_two_runs_with_and_without_loader_processes_match(folder: Path, tmp_path: Path) -> None:
    lines = {}
    for workers in (0, 2):
        run = tmp_path / f"workers{workers}"
        result = CliRunner().invoke(make_cli(), [
            "run", "--dataset", "imagefolder", "--data-root", str(folder), "-o", "dataset.image_size=16", "-o",
            "dataset.resize=20", "--model", "smallcnn", "--batch-size", "4", "--epochs", "1", "--seed", "3",
            "--num-workers", str(workers), "--run-dir", str(run), "-q"])
        assert result.exit_code == 0, result.output
        lines[workers] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == lines[2] and len(lines[0]) == 1


def live_children() -> set[int]:
    """This process's children that have not ended (zombies, ended but not reaped, left out)."""
    found = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # (a thread, or a child, that ended meanwhile)
            for pid in (task / "children").read_text().split():
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.add(int(pid))
    return found


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task").exists(), reason="needs Linux's /proc")
def test_loader_processes_end_with_the_run_not_at_the_next_garbage_collection(folder: Path, tmp_path: Path) -> None:
    # They ignore SIGTERM (a stop sent to the process group is the trainer's); left to the garbage collector,
    # which closes their queues first, each was waited for 5 s in whatever ran next, and then left running.
    before = live_children()
    first_epochs(folder, 2)  # a Batches dropped: its loader processes go with it
    assert live_children() <= before
    result = CliRunner().invoke(make_cli(), [
        "run", "--dataset", "imagefolder", "--data-root", str(folder), "-o", "dataset.image_size=16", "--model", "mlp",
        "--batch-size", "4", "--epochs", "1", "--num-workers", "2", "--run-dir", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 0, result.output
    assert live_children() <= before  # a finished run's (its trainer not yet collected)
    result = CliRunner().invoke(make_cli(), ["eval", "--checkpoint", str(tmp_path / "run")])  # (the run's 2 loader processes)
    assert result.exit_code == 0, result.output
    assert live_children() <= before
