"""The folder each run leaves behind: ``config.toml``, ``metrics.jsonl``,
``summary.json``, and what plugins add."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from trainer_core.errors import TrainerError, UsageError
from trainer_core.files import atomic_write_bytes

log = logging.getLogger("trainer_core")

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
LOCK = ".lock"
#: The run folder's sub-folder our own atomic writes go to (the checkpoint plugin's default).
CHECKPOINTS = "checkpoints"
#: The names :func:`trainer_core.files.atomic_writer` gives its temporary files: ``.NAME.XXXXXXXX.tmp``.
TEMP_FILE = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


#: The lock files' descriptors this process holds.  A forked child (a DataLoader worker) closes
#: its copies at once: the lock is the parent's, and must go when the parent ends, not when its
#: last orphaned worker does.
_HELD: set[int] = set()


def _forget_locks() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_locks)


class RunDir:
    """An open run folder, locked against a second writer until :meth:`close`.

    The lock is an OS lock (``flock``) on ``.lock`` in the folder, held by the open
    file for the run's lifetime: the kernel releases it when the process ends, however
    it ends, so a killed run's folder is free at once and a live run's folder is never
    taken over.  What the file says (the process id and host of its holder) is only
    shown in messages.

    :ivar created: whether this :meth:`create` made the folder (a run refused before
        it trained removes such a folder again: see :meth:`finish`).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.created = False
        self._made: list[Path] = []  # the folders create() made, deepest first
        self._lock_fd: int | None = None
        self._lock_pid = 0
        # A continued run's new config.toml waits until its checkpoint is restored
        # (continue_from): a resume refused before that leaves the folder's record as it was.
        self._held_back: Mapping[str, Any] | None = None
        self._holding_back = False
        self._replacing: str | None = None  # "overwrite", "restart": the run the folder holds goes at begin()
        # What an existing folder held when it was taken without a run in it (a lock file, stale temporary
        # files): everything else there is then this run's, for a refused run to remove (see finish).
        self._found: set[str] | None = None

    @classmethod
    def create(cls, path: Path, *, resume: bool = False, overwrite: bool = False, restart: bool = False) -> RunDir:
        """Create (or, to continue its run, reopen) ``path`` and take its lock.

        :param resume: continue the run the folder holds.  Its ``metrics.jsonl`` is
            checked now, and its ``config.toml`` and ``summary.json`` change only once
            the checkpoint is restored (:meth:`continue_from`).
        :param overwrite: replace the run the folder holds (its files change only
            once the new run has passed its start: :meth:`begin`).
        :param restart: start afresh in the folder of a run that left no checkpoint
            (``--resume auto``): as ``overwrite``, but only in a run's folder.

        Without one of them a folder holding anything but a lock file is an error.
        Replacing a run replaces only the files runs write (``metrics.jsonl`` is
        started anew, ``config.toml`` and ``summary.json`` rewritten); the temporary
        files removed are only those of our own atomic writes, in the run folder and
        its ``checkpoints`` folder.
        """
        if path.exists() and not path.is_dir():
            raise UsageError(f"run folder {path} exists and is not a folder; choose another --run-dir")
        run = cls(path)
        run._make()
        try:
            run._lock()
            # Checked with the lock held: a run that took the folder and finished meanwhile is seen.
            if occupied(path):
                if restart and not resume and not overwrite and not (path / CONFIG).is_file():
                    raise UsageError(f"run folder {path} holds files but no run (no {CONFIG}); choose another --name or --run-dir")
                if not (resume or overwrite or restart):
                    raise UsageError(f"run folder {path} already holds a run; pass --overwrite, --resume {path}, or another --name")
                run._remove_temp_files()
                if resume:
                    read_metrics(path / METRICS)  # refused now, before anything in the folder changes
                    run._holding_back = (path / CONFIG).exists() or (path / SUMMARY).exists()
                else:
                    # Replaced once the new run has passed its start (begin): a start refused before
                    # that (a plugin's check of its options) leaves the run the folder holds as it was.
                    run._holding_back = True
                    run._replacing = "restart" if restart and not overwrite else "overwrite"
            elif not run.created:
                run._found = {entry.name for entry in path.iterdir()}
        except BaseException:
            run.close()
            run._unmake(empty_only=True)
            raise
        return run

    def _make(self) -> None:
        missing, folder = [], self.path
        while not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        try:
            self.path.mkdir(parents=True)
            self.created = True
        except FileExistsError:
            if not self.path.is_dir():
                raise UsageError(f"run folder {self.path} exists and is not a folder; choose another --run-dir") from None
        except OSError as exc:
            raise UsageError(f"cannot create run folder {self.path}: {exc.strerror}") from None
        self._made = [p for p in missing if p != self.path or self.created]

    def _unmake(self, *, empty_only: bool) -> None:
        """Remove the folders :meth:`create` made (only when empty, or the run folder with what is in it)."""
        if self.created and not empty_only:
            shutil.rmtree(self.path, ignore_errors=True)
        for folder in self._made:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        self.created, self._made = False, []

    def _discard(self) -> None:
        """Remove what a refused run wrote: the folder it made, or what it added to a folder
        it was given empty (the lock file goes with :meth:`close`)."""
        if self.created:
            self._unmake(empty_only=False)
            return
        for entry in self.path.iterdir():
            if entry.name not in (self._found or set()) and entry.name != LOCK:
                with contextlib.suppress(OSError):
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()

    def _lock(self) -> None:
        lock = self.path / LOCK
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise UsageError(f"cannot write to run folder {self.path}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    holder = _holder(lock)
                    raise UsageError(f"run folder {self.path} is in use by another run{holder}; wait for it to end or choose "
                                     "another --name") from None
                raise UsageError(f"cannot lock run folder {self.path}: {exc.strerror}; its file system does not support "
                                 "file locks: choose a --runs-root on one that does") from None
            # A run that ended between our open and our lock removed the file (another may have made a new one).
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._lock_fd, self._lock_pid = fd, os.getpid()
        _HELD.add(fd)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except OSError as exc:  # a full disk: refused now, not at the first metrics line
            self.close()
            raise UsageError(f"cannot write to run folder {self.path}: {exc.strerror}") from None

    def _remove_temp_files(self) -> None:
        """Half-written temporary files of a killed run's atomic writes: with the lock held, none is being written."""
        for folder in (self.path, self.path / CHECKPOINTS):
            if folder.is_dir():
                for stale in folder.iterdir():
                    if TEMP_FILE.fullmatch(stale.name) and stale.is_file() and not stale.is_symlink():
                        stale.unlink(missing_ok=True)

    def close(self) -> None:
        """Release the folder (removing its lock file)."""
        if self._lock_fd is not None and self._lock_pid == os.getpid():  # (a forked child holds no lock: _forget_locks)
            # Removed before the lock is released: a run waiting on this file sees it is gone and makes its own.
            with contextlib.suppress(FileNotFoundError):
                (self.path / LOCK).unlink()
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            _HELD.discard(self._lock_fd)
        self._lock_fd = None

    def write_config(self, config: Mapping[str, Any]) -> None:
        if self._holding_back:
            self._held_back = config
            return
        with _writing(self.path / CONFIG):
            import tomli_w  # here, not at the top: a run with no folder (benchmarks on a bare GPU machine) needs no TOML writer

            atomic_write_bytes(self.path / CONFIG, tomli_w.dumps(dict(config)).encode())

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        with _writing(self.path / METRICS), open(self.path / METRICS, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(_jsonable(record)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def continue_from(self, step: int) -> None:
        """A continued run has restored its checkpoint at ``step``: from here on its
        folder is its own again: write its config and drop the metrics records after
        ``step`` (the resumed run writes them again)."""
        self._release_held_back()
        self.truncate_metrics(step)

    def begin(self) -> None:
        """A new run has passed its start (its plugins' checks): from here on the folder
        is its own: write its config, and drop the metrics of a run it replaces."""
        self._release_held_back()

    def _release_held_back(self) -> None:
        if self._holding_back:
            self._holding_back = False
            if self._replacing == "restart":
                log.warning("run folder %s has no checkpoint to continue from: its run starts afresh there "
                            "(its %s, %s and %s are replaced)", self.path, CONFIG, METRICS, SUMMARY)
            if self._replacing:
                self._replacing = None
                with _writing(self.path / METRICS):
                    (self.path / METRICS).unlink(missing_ok=True)
            if self._held_back is not None:
                self.write_config(self._held_back)

    def truncate_metrics(self, keep_until_step: int) -> None:
        """Drop records after ``keep_until_step``, and a last line cut short by a kill."""
        path = self.path / METRICS
        if not path.exists():
            return
        kept = [line for line, step in read_metrics(path) if step <= keep_until_step]
        with _writing(path):
            atomic_write_bytes(path, b"".join(line + b"\n" for line in kept))

    def finish(self, summary: Mapping[str, Any] | None, failed: bool, *, discard: bool = False) -> None:
        """Write ``summary`` (when given: the main process's) as ``summary.json`` and
        release the folder.  A failure to write it (a full disk) is raised, unless
        the run itself failed, whose own error says more: then it is a warning.

        :param discard: the run was refused before it trained (bad input): a folder this
            run made goes again, with what is in it, and an empty folder it was given is left
            empty again, instead of keeping a failed run's record.
        A run that failed before it passed its start (a continued run before its checkpoint
        was restored, a replacing run before :meth:`begin`) leaves the folder's record
        (``config.toml``, ``metrics.jsonl``, ``summary.json``) as it was."""
        if discard and (self.created or self._found is not None):
            self._discard()
            self.close()
            return
        try:
            if self._holding_back and failed:
                summary = None  # the folder's record stays as it was
            elif self._holding_back:  # (a folder reopened to continue, and no checkpoint given: a plain run)
                self._release_held_back()
            if summary is not None:
                self.write_summary(summary)
        except TrainerError as exc:
            if not failed:
                raise
            log.warning("%s", exc)
        finally:
            self.close()

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        with _writing(self.path / SUMMARY):
            atomic_write_bytes(self.path / SUMMARY, (json.dumps(_jsonable(summary), indent=2) + "\n").encode())


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """A failed write (a full disk, a read-only folder) as one line naming the file."""
    try:
        yield
    except OSError as exc:
        raise TrainerError(f"cannot write {path}: {exc.strerror or exc}; free some space or choose another --run-dir") from None


def read_metrics(path: Path) -> list[tuple[bytes, int]]:
    """The records of ``metrics.jsonl`` as (line, step), for a resumed run to keep those
    up to its checkpoint.  A last line without its newline was cut short by a kill or a
    full disk and is left out; any other line that is not a JSON object with a whole,
    non-negative ``step`` is an error naming it (nothing is dropped unseen)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    lines = data.split(b"\n")[:-1]  # (the last piece: empty, or a line cut short)
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            problem = "is not UTF-8 text"
        except ValueError:
            problem = "is not JSON"
        else:
            step = record.get("step") if isinstance(record, dict) else None
            if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
                records.append((line, step))
                continue
            problem = ("has no whole step number" if isinstance(record, dict) else "is not a JSON object")
        raise UsageError(f"{path} line {number} {problem}, so the run cannot be continued; repair or delete that line "
                         "(nothing in the run folder was changed)")
    return records


def occupied(path: Path) -> bool:
    """Whether folder ``path`` holds anything but a lock file and our own temporary files."""
    try:
        return any(entry.name != LOCK and not TEMP_FILE.fullmatch(entry.name) for entry in path.iterdir())
    except FileNotFoundError:
        return False


def lock_is_stale(lock: Path) -> bool:
    """Whether no process holds the lock of run-folder lock file ``lock`` (its run was killed,
    or ended without removing it).  Asked without waiting; a lock file that cannot be opened
    counts as held."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _holder(lock: Path) -> str:
    """`` (process N on HOST)`` as the lock file says, or nothing when it says nothing readable."""
    try:
        pid, host = lock.read_text(encoding="utf-8").split()
        return f" (process {int(pid)} on {host})"
    except (OSError, ValueError):
        return ""


def default_run_path(runs_root: Path, model: str, dataset: str) -> Path:
    """``runs_root/<model>-<dataset>-<time>``, with a suffix if that is taken."""
    base = f"{model}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = runs_root / base, 1
    while path.exists():
        n += 1
        path = runs_root / f"{base}-{n}"
    return path


def _jsonable(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as strings a reader can spot."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
