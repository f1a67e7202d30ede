"""``summary.json``: how a run ended, its final and best metrics, timing and versions."""

from __future__ import annotations

import datetime
import math
import platform
from typing import TYPE_CHECKING, Any

import torch

from trainer_core import __version__

if TYPE_CHECKING:
    from trainer_core.trainer import Trainer


def run_summary(trainer: Trainer, status: str, duration: float, error: str | None = None) -> dict[str, Any]:
    """What ``summary.json`` holds: final and best metrics, timing, versions."""
    history = trainer.state.history
    best = {}
    for key, pick in (("val/acc", max), ("val/loss", min)):
        values = [m for m in history if key in m and math.isfinite(m[key])]
        if values:
            chosen = pick(values, key=lambda m: m[key])
            best[key] = {"value": chosen[key], "epoch": chosen["epoch"], "step": chosen["step"]}
    seconds = trainer.state.train_seconds
    return {
        "status": status,
        "stop_reason": trainer.state.stop_reason,
        "error": error,
        "epochs": trainer.state.epoch,
        "steps": trainer.state.step,
        "final": trainer.state.metrics,
        "best": best,
        "started": datetime.datetime.fromtimestamp(trainer.state.started_at, datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "duration_s": round(duration, 3),
        "train_seconds": round(seconds, 3),
        "samples_per_s": round(trainer.state.train_samples / seconds, 1) if seconds > 0 else None,
        "compile_seconds": round(trainer.state.compile_seconds, 3) if trainer.config.compile else None,
        "skipped_steps": trainer.stepper.skipped if trainer.stepper is not None else 0,
        "device": str(trainer.device),
        "processes": trainer.world_size,
        "versions": {"trainer-core": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }


