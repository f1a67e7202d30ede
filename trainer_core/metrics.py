"""Metric names, and watching an evaluation metric: what plugins that name
metrics or rank, stop or schedule on one (checkpoint, early-stopping, a third
party's) share."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal, Mapping, Sequence

from trainer_core.errors import UsageError
from trainer_core.suggest import did_you_mean
from trainer_core.task import Mode, metric_mode

if TYPE_CHECKING:
    from trainer_core.plugin_api import PluginAPI


def resolve_monitor(trainer: PluginAPI, option: str, metric: str | None,
                    mode: Literal["auto", "min", "max"] = "auto") -> tuple[str, Mode]:
    """The metric to watch and which way is better, for option ``option``
    (e.g. ``checkpoint.monitor``), in ``on_fit_start``: ``metric`` or the task's
    headline metric; ``mode`` or, for ``auto``, what the task says of the metric.

    A metric no evaluation can produce is refused here, before training, when
    that is knowable: when no plugin collects metrics, an evaluation produces
    only the core's and the task's.  Not in a run of several processes: a
    rank-zero-only producer is missing on the other ranks, which would refuse
    alone; :func:`check_monitor` on the first evaluation decides there.
    """
    metric = metric or trainer.task.headline
    produced = ["train/loss", *trainer.task.modes]
    if trainer.world_size == 1 and metric not in produced and not trainer.pm.hook.collect_eval_metrics.get_hookimpls():
        raise unknown_metric(option, metric, produced)
    return metric, metric_mode(metric, trainer.task) if mode == "auto" else mode


def check_monitor(option: str, metric: str, metrics: Mapping[str, float]) -> None:
    """Refuse ``metric`` when the evaluation ``metrics`` lack it."""
    if metric not in metrics:
        raise unknown_metric(option, metric, [k for k in metrics if k not in ("epoch", "step")])


def unknown_metric(option: str, metric: str, available: Sequence[str]) -> UsageError:
    """The error for option ``option`` naming a metric no evaluation produces."""
    return UsageError(
        f"{option}: no evaluation produces '{metric}'{did_you_mean(metric, available)}; "
        f"available metrics: {', '.join(available)}"
    )


_NOT_IN_KEY = re.compile(r"[^\w.-]+")


def metric_keys(names: Sequence[str]) -> list[str]:
    """A metric-key-safe, unique key per name (a class, a label): ``"T-shirt/top"`` gives
    ``"T-shirt_top"`` (a ``/`` would nest TensorBoard tags); an empty or
    repeated result gets the class index appended."""
    keys: list[str] = []
    for index, name in enumerate(names):
        key = _NOT_IN_KEY.sub("_", str(name)).strip("_") or f"class{index}"
        if key in keys:
            key = f"{key}_{index}"
        keys.append(key)
    return keys
