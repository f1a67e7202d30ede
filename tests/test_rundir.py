"""Run folders: one writer at a time, atomic files, nothing lost on failure."""

import json
import os
import subprocess
import sys

import pytest

from trainer_core import UsageError
from trainer_core.files import atomic_write_bytes
from trainer_core.rundir import LOCK, RunDir


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path):
    first = RunDir.create(tmp_path / "run")
    with pytest.raises(UsageError, match="is in use by another run"):
        RunDir.create(tmp_path / "run", overwrite=True)
    first.close()
    RunDir.create(tmp_path / "run", overwrite=True).close()


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK).write_text(dead.stdout.strip())
    RunDir.create(tmp_path / "run", resume=True).close()
    assert not (tmp_path / "run" / LOCK).exists()


def test_an_atomic_write_that_fails_keeps_the_old_file(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_bytes(path, b'{"good": true}')

    class Boom(Exception):
        pass

    from trainer_core.files import atomic_writer

    with pytest.raises(Boom):
        with atomic_writer(path) as handle:
            handle.write(b'{"half')
            raise Boom
    assert json.loads(path.read_text()) == {"good": True}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_an_unwritable_location_is_a_clear_error(tmp_path):
    # A regular file where a folder should be fails for root too (unlike permission bits).
    (tmp_path / "taken").write_text("not a folder")
    with pytest.raises(UsageError, match=r"cannot create run folder .*taken/run: Not a directory"):
        RunDir.create(tmp_path / "taken" / "run")


def test_atomic_files_get_the_usual_permissions(tmp_path):
    # mkstemp makes 0600 files; results must be readable by others as any file the user writes.
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "summary.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o644


def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path):
    from trainer_core.checkpointing import load_checkpoint

    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(UsageError, match=r"photo.png is not a checkpoint \(not a file torch.save writes\)"):
        load_checkpoint(tmp_path / "photo.png")
