"""``summary.json``: how a run ended, its final and best metrics, timing and versions."""

from __future__ import annotations

import datetime
import math
import platform
from typing import TYPE_CHECKING, Any

import torch

from trainer_core import __version__
from trainer_core.task import metric_mode

if TYPE_CHECKING:
    from trainer_core.config import RunConfig
    from trainer_core.state import TrainState
    from trainer_core.task import Task


def best_metrics(history: list[dict[str, float]], task: Task) -> dict[str, dict[str, float]]:
    """The best evaluation of each of the task's metrics: value, epoch and step."""
    best = {}
    for key in task.modes:
        values = [m for m in history if key in m and math.isfinite(m[key])]
        if values:
            pick = min if metric_mode(key, task) == "min" else max
            chosen = pick(values, key=lambda m: m[key])
            best[key] = {"value": chosen[key], "epoch": chosen["epoch"], "step": chosen["step"]}
    return best


def run_summary(state: TrainState, config: RunConfig, task: Task, *, status: str, session_duration: float, error: str | None,
                skipped_steps: int, device: torch.device, processes: int,
                checkpoints: dict[str, str] | None = None) -> dict[str, Any]:
    """What ``summary.json`` holds: final and best metrics, timing, versions, and the
    checkpoint files plugins named (``checkpoints``: ``best``, ``last``, relative to the run folder)."""
    seconds = state.train_seconds
    # (duration_s: every session of the run, a resume's included; session_duration_s: the last one's)
    return {
        "status": status,
        "stop_reason": state.stop_reason,
        "error": error,
        "task": task.name,
        "headline": task.headline,
        "epochs": state.epoch,
        "steps": state.step,
        "final": state.metrics,
        "best": best_metrics(state.history, task),
        "checkpoints": dict(checkpoints or {}),
        # Weights put back when training ended: "final" is their evaluation, the last epoch's is kept.
        "restored": state.restored,
        "last_epoch": state.last_epoch_metrics if state.restored is not None else state.metrics,
        "started": datetime.datetime.fromtimestamp(state.started_at, datetime.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(state.duration_seconds, 3),
        "session_duration_s": round(session_duration, 3),
        "train_seconds": round(seconds, 3),
        "samples_per_s": round(state.train_samples / seconds, 1) if seconds > 0 else None,
        "compile_seconds": round(state.compile_seconds, 3) if config.compile else None,
        "skipped_steps": skipped_steps,
        "device": str(device),
        "processes": processes,
        "versions": {"trainer-core": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }
