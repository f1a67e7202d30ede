"""``trainer runs``: what each run folder under a runs root says about its run."""

from __future__ import annotations

import datetime
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

from trainer_core.errors import UsageError


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def describe_run(folder: Path, metric: str | None = None) -> dict[str, Any]:
    """One row of ``trainer runs``: what a run folder says about its run; the
    best of ``metric``, by default the run's headline metric (``val/acc`` for a
    run that did not record one)."""
    from trainer_core.config import tomllib
    from trainer_core.rundir import CONFIG, LOCK, METRICS, SUMMARY, lock_is_stale

    try:
        config = tomllib.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    summary = _read_json(folder / SUMMARY)
    records = []
    try:
        for line in (folder / METRICS).read_text(encoding="utf-8").splitlines():
            record = _read_json_line(line)
            if record is not None:
                records.append(record)
    except OSError:
        pass
    if metric is None:
        metric = summary.get("headline") if isinstance(summary, dict) and isinstance(summary.get("headline"), str) else None
        metric = metric or _headline_of(config.get("task"))
    best = best_record(records, metric)
    # A finished run says when it first started; a running or killed one, by its config file's time.
    started = (folder / CONFIG) if (folder / CONFIG).exists() else folder
    started_at = started.stat().st_mtime
    if isinstance(summary, dict):
        status = str(summary.get("status", "unknown"))
        duration = summary.get("duration_s")
        try:
            started_at = datetime.datetime.fromisoformat(str(summary["started"])).timestamp()
        except (KeyError, ValueError):
            pass  # a summary written before it recorded the start
    else:
        lock = folder / LOCK
        status = "running" if lock.exists() and not lock_is_stale(lock) else "incomplete"
        duration = None
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
        "status": status,
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

    usable = [r for r in records if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    if not usable:
        return None
    return (min if metric_mode(metric) == "min" else max)(usable, key=lambda r: r[metric])


def find_runs(folder: Path) -> list[Path]:
    """``folder`` itself if it is a run folder, else the run folders in it."""
    from trainer_core.rundir import CONFIG, METRICS, SUMMARY

    def is_run(path: Path) -> bool:
        return any((path / name).exists() for name in (CONFIG, SUMMARY, METRICS))

    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder; runs are written under --runs-root (default: runs)")
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
    if not isinstance(seconds, (int, float)):
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"
