"""What a checkpoint's contents may not do (issue 14): choose a path outside
the run folder, go unnoticed when damaged, or leave an evicted file behind."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from trainer_core.checkpointing import archive_damage, load_checkpoint, newest_checkpoint, save_checkpoint
from trainer_core.cli import make_cli

JOB = ["--dataset", "fake", "-o", "dataset.train_size=64", "-o", "dataset.val_size=32", "-o", "model.width=4",
       "--batch-size", "16", "--seed", "1", "-q", "--plugins", "checkpoint"]


def trainer(*args: str) -> tuple[int, str]:
    done = CliRunner().invoke(make_cli(), list(args))
    return done.exit_code, done.output


def train(run: Path, epochs: int, *more: str) -> None:
    code, output = trainer("run", *JOB, "--epochs", str(epochs), "--run-dir", str(run), *more)
    assert code == 0, output


def rewrite(path: Path, change) -> None:  # type: ignore[no-untyped-def]
    payload = load_checkpoint(path)
    change(payload)
    save_checkpoint(path, payload)


def test_a_kept_file_named_by_a_path_is_never_deleted(tmp_path: Path) -> None:
    run, victim = tmp_path / "run", tmp_path / "precious.pt"
    victim.write_bytes(b"not the run's")
    train(run, 1, "-o", "checkpoint.monitor=val/loss")
    last = run / "checkpoints" / "last.pt"
    for epochs, name in ((2, str(victim)), (3, f"../../{victim.name}")):
        # The worst score ranked: the next better checkpoint would evict (delete) it.
        rewrite(last, lambda p: p["plugins"]["checkpoint"]["kept"].__setitem__(0, {
            "file": name, "score": 1e9, "epoch": 1, "step": 4}))
        code, output = trainer("run", "--resume", str(last), "--epochs", str(epochs))
        assert code == 0, output
        assert victim.read_bytes() == b"not the run's"


def test_a_resume_writes_where_the_command_line_says_not_where_the_checkpoint_says(tmp_path: Path) -> None:
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    train(run, 1)
    last = run / "checkpoints" / "last.pt"
    rewrite(last, lambda p: p["config"]["plugins"]["checkpoint"].__setitem__("dirpath", str(elsewhere)))
    code, output = trainer("run", "--resume", str(last), "--epochs", "2")
    assert code == 0, output
    assert not elsewhere.exists()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["epoch"] == 2


def flip_a_weight_byte(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        record = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 16)
    data = bytearray(path.read_bytes())
    start = record.header_offset  # a local file header: 30 bytes, the name and its own extra field, then the data
    offset = start + 30 + int.from_bytes(data[start + 26 : start + 28], "little") + int.from_bytes(data[start + 28 : start + 30], "little") + 8
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_refused_and_resume_auto_takes_the_previous_good_one(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(run, 2)
    last = run / "checkpoints" / "last.pt"
    [best] = (run / "checkpoints").glob("best-*.pt")
    flip_a_weight_byte(last)
    torch.load(last, weights_only=True)  # torch itself loads it, with a wrong weight
    assert "fails its checksum" in (archive_damage(last) or "")
    code, output = trainer("eval", "--checkpoint", str(last))
    assert code == 2 and "is damaged" in output and len(output.strip().splitlines()) == 1
    assert newest_checkpoint(run) == best
    code, output = trainer("run", *JOB, "--epochs", "3", "--run-dir", str(run), "--resume", "auto")
    assert code == 0, output
    assert load_checkpoint(last)["state"]["epoch"] == 3


def test_a_resume_removes_the_best_file_a_cut_save_left_behind(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(run, 2)
    folder = run / "checkpoints"
    [best] = folder.glob("best-*.pt")
    # Saved, recorded as evicted, never deleted (the save was cut): epoch 1 <= the resumed epoch.
    orphan = folder / "best-epoch001-val_acc0.0100.pt"
    shutil.copy(best, orphan)
    later = folder / "best-epoch009-val_acc0.0100.pt"  # a later epoch's file (an earlier checkpoint resumed): kept
    shutil.copy(best, later)
    code, output = trainer("run", "--resume", str(folder / "last.pt"), "--epochs", "3")
    assert code == 0, output
    assert not orphan.exists() and later.exists()
    assert len(list(folder.glob("best-*.pt"))) == 2  # save_top_k=1: the kept best, and the later file
