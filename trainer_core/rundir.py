"""The folder each run leaves behind: ``config.toml``, ``metrics.jsonl``,
``summary.json``, and what plugins add."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
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


class RunDir:
    """An open run folder, locked against a second writer until :meth:`close`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._locked = False

    @classmethod
    def create(cls, path: Path, *, resume: bool = False, overwrite: bool = False) -> RunDir:
        """Create (or, to resume, reopen) ``path`` and take its lock.

        An existing non-empty folder is an error unless resuming or ``overwrite``
        is given; overwriting replaces only the files this run writes.
        """
        if path.exists() and not path.is_dir():
            raise UsageError(f"run folder {path} exists and is not a folder; choose another --run-dir")
        if path.is_dir() and any(path.iterdir()) and not (resume or overwrite):
            raise UsageError(f"run folder {path} already holds a run; pass --overwrite, --resume {path}, or another --name")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create run folder {path}: {exc.strerror}") from None
        run = cls(path)
        run._lock()
        # Half-written temporary files of a killed run's saves (atomic_writer's): with the lock
        # held, none of them is being written.
        for stale in path.glob("**/.*.tmp"):
            stale.unlink(missing_ok=True)
        if overwrite and not resume:
            with contextlib.suppress(FileNotFoundError):
                (path / METRICS).unlink()
        return run

    def _lock(self) -> None:
        lock = self.path / LOCK
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if lock_is_stale(lock):
                    with contextlib.suppress(FileNotFoundError):
                        lock.unlink()
                    continue
                raise UsageError(f"run folder {self.path} is in use by another run ({lock} exists); wait or choose another --name") from None
            except OSError as exc:
                raise UsageError(f"cannot write to run folder {self.path}: {exc.strerror}") from None
            try:
                with os.fdopen(fd, "w") as handle:
                    handle.write(str(os.getpid()))
            except OSError as exc:  # a full disk: a lock without its pid would never be taken over
                lock.unlink(missing_ok=True)
                raise UsageError(f"cannot write to run folder {self.path}: {exc.strerror}") from None
            self._locked = True
            return

    def close(self) -> None:
        if self._locked:
            with contextlib.suppress(FileNotFoundError):
                (self.path / LOCK).unlink()
            self._locked = False

    def write_config(self, config: Mapping[str, Any]) -> None:
        with _writing(self.path / CONFIG):
            import tomli_w  # here, not at the top: a run with no folder (benchmarks on a bare GPU machine) needs no TOML writer

            atomic_write_bytes(self.path / CONFIG, tomli_w.dumps(dict(config)).encode())

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        with _writing(self.path / METRICS), open(self.path / METRICS, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(_jsonable(record)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def truncate_metrics(self, keep_until_step: int) -> None:
        """Drop records after ``keep_until_step`` (a resumed run writes them again)."""
        path = self.path / METRICS
        if not path.exists():
            return
        steps = [(line, _step(line)) for line in path.read_text().splitlines()]
        kept = [line for line, step in steps if step is not None and step <= keep_until_step]
        with _writing(path):
            atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())

    def finish(self, summary: Mapping[str, Any] | None, failed: bool) -> None:
        """Write ``summary`` (when given: the main process's) as ``summary.json`` and
        release the folder.  A failure to write it (a full disk) is raised, unless
        the run itself failed, whose own error says more: then it is a warning."""
        try:
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


def _step(line: str) -> int | None:
    """A metrics record's step; ``None`` for a line cut short by a crash or a full disk."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return None


def lock_is_stale(lock: Path) -> bool:
    """A lock whose process is gone was left by a killed run."""
    try:
        pid = int(lock.read_text().strip() or 0)
    except (OSError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


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
