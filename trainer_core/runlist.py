"""``trainer runs``: what each run folder under a runs root says about its run."""

from __future__ import annotations

import datetime
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

from trainer_core.errors import UsageError


def _read_text(path: Path, problems: list[str]) -> str | None:
    """``path``'s text; None when it is missing, or unreadable (said in ``problems``)."""
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        problems.append(f"cannot read {path.name} ({exc.strerror or type(exc).__name__})")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        problems.append(f"{path.name} is not UTF-8 text (line {line})")
    return None


def describe_run(folder: Path, metric: str | None = None) -> dict[str, Any]:
    """One row of ``trainer runs``: what a run folder says about its run; the
    best of ``metric``, by default the run's headline metric (``val/acc`` for a
    run that did not record one)."""
    from trainer_core.config import tomllib
    from trainer_core.rundir import CONFIG, LOCK, METRICS, SUMMARY, lock_is_stale

    problems: list[str] = []  # what makes the run's files unreadable: the row says so, the others list on
    config: dict[str, Any] = {}
    text = _read_text(folder / CONFIG, problems)
    if text is not None:
        try:
            config = tomllib.loads(text)
        except ValueError as exc:
            problems.append(f"{CONFIG} is not valid TOML ({' '.join(str(exc).split())})")
    summary = None
    text = _read_text(folder / SUMMARY, problems)
    if text is not None:
        try:
            summary = json.loads(text)
        except ValueError:
            problems.append(f"{SUMMARY} is not JSON")
        if summary is not None and not isinstance(summary, dict):
            problems.append(f"{SUMMARY} is not a JSON object")
            summary = None
    records = []
    text = _read_text(folder / METRICS, problems)
    lines = text.split("\n") if text is not None else []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = _read_json_line(line)
        if record is not None:
            records.append(record)
        elif number < len(lines):  # (not the last piece: a line cut short by a kill has no newline)
            problems.append(f"{METRICS} line {number} is not a JSON object")
            break
    if metric is None:
        metric = summary.get("headline") if isinstance(summary, dict) and isinstance(summary.get("headline"), str) else None
        metric = metric or _headline_of(config.get("task"))
    best = best_record(records, metric)
    # A finished run says when it first started; a running or killed one, by its config file's time.
    started = (folder / CONFIG) if (folder / CONFIG).exists() else folder
    started_at = started.stat().st_mtime
    lock = folder / LOCK
    # A live run holds the lock: one continuing (--resume) or replacing (--overwrite) a finished run
    # is running, whatever the summary.json of the session before it says.
    running = lock.exists() and not lock_is_stale(lock)
    if isinstance(summary, dict) and not running:
        status = str(summary.get("status", "unknown"))
        duration = summary.get("duration_s")  # every session of the run, a resume's included
        session = summary.get("session_duration_s")
        try:
            first = datetime.datetime.fromisoformat(str(summary["started"])).timestamp()
            time.localtime(first)  # (a date a clock can show)
            started_at = first
        except (KeyError, ValueError, OverflowError, OSError):
            pass  # a summary written before it recorded the start
    else:
        status = "running" if running else "incomplete"
        duration = session = None
    if problems:
        status = "unreadable"
    return {
        "name": folder.name,
        "path": str(folder),
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(started_at)),
        "model": _name(config.get("model")),
        "dataset": _name(config.get("dataset")),
        "epochs": records[-1].get("epoch") if records else None,
        "metric": metric,
        "best": best[metric] if best else None,
        "best_epoch": best.get("epoch") if best else None,
        "duration_s": duration,
        "session_duration_s": session,
        "status": status,
        "problem": "; ".join(problems) or None,
    }


def _headline_of(task: Any) -> str:
    """The headline metric of a run's saved ``[task]`` table (``val/acc`` when unknown)."""
    from trainer_core.entrypoints import TASKS, Registry

    name = task.get("name") if isinstance(task, dict) else None
    try:
        return str(Registry(TASKS).get(str(name)).load().headline) if name else "val/acc"
    except Exception:  # an uninstalled or broken task: the table still lists the run
        return "val/acc"


def _read_json_line(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None  # a line cut short by a kill
    return record if isinstance(record, dict) else None


def _name(table: Any) -> str:
    return str(table.get("name", "?")) if isinstance(table, dict) else "?"


def best_record(records: Sequence[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The record with the best finite ``metric``: lowest for losses and errors, highest otherwise."""
    from trainer_core.task import metric_mode  # the rule checkpoint and early-stopping rank by

    usable = [r for r in records if _finite(r.get(metric))]
    if not usable:
        return None
    return (min if metric_mode(metric) == "min" else max)(usable, key=lambda r: r[metric])


def _finite(value: Any) -> bool:
    """A metric value to rank by: a finite number (not a bool, nor an int too large for a float)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def find_runs(folder: Path) -> list[Path]:
    """``folder`` itself if it is a run folder, else the run folders in it."""
    from trainer_core.rundir import CONFIG, METRICS, SUMMARY

    def is_run(path: Path) -> bool:
        return any((path / name).exists() for name in (CONFIG, SUMMARY, METRICS))

    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder; give the folder that holds the run folders: trainer runs FOLDER "
                         "(trainer run writes them under its --runs-root, runs by default)")
    if is_run(folder):
        return [folder]
    return sorted(p for p in folder.iterdir() if p.is_dir() and is_run(p))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """Columns padded to their widest cell; ``right`` aligns numbers to the right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def format_duration(seconds: Any) -> str:
    if not _finite(seconds):
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"
