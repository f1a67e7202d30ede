"""The task: what the targets are, the loss, the validation metrics, what
"better" means and what a prediction is.

The loop knows a task only through :class:`Task`'s methods, so classification
is one task among others.  Tasks are registered like plugins, in the
``trainer.tasks`` entry-point group; a dataset names the task it is for
(:attr:`~trainer_core.DataBundle.task`) and ``--task`` / ``[task]`` override it.
A task's options are its constructor's typed keyword arguments
(``-o task.loss=huber``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal, Mapping

from trainer_core.errors import UsageError

if TYPE_CHECKING:
    import torch

    from trainer_core.data import DataBundle

DEFAULT_TASK = "classification"
Mode = Literal["min", "max"]


class Task:
    """Base class of tasks: subclass it and register the class under
    ``[project.entry-points."trainer.tasks"]``.

    Validation metrics accumulate on the device as a 1-D ``float64`` tensor of
    sums (:meth:`new_sums`, :meth:`add_sums`): the core adds them over the
    batches and over the ranks of a distributed run, then turns the totals into
    metrics (:meth:`metrics`).  Sums add up exactly across ranks, averages do not.

    :cvar headline: the metric that says how good a model is: what
        ``checkpoint`` and ``early-stopping`` monitor by default.
    :cvar modes: ``"min"`` or ``"max"`` (which is better) for each metric the
        task produces.
    :cvar export_doc: what an exported model returns, in words (stored in the file).
    """

    #: The registered name, set when the task is loaded (``classification``...).
    name: str = ""
    headline: str = "val/loss"
    modes: Mapping[str, Mode] = {"val/loss": "min"}
    export_doc: str = "the model's outputs"

    def check(self, data: DataBundle) -> None:
        """Raise ``ValueError`` (one line: what does not fit) when ``data`` is not
        data for this task: wrong target type or shape, values out of range.
        Called before the run folder is created."""

    def setup(self, data: DataBundle, device: torch.device) -> None:
        """Prepare for a run on ``data``, which :meth:`check` accepted (statistics
        of the training split, tensors on ``device``).  Called once by the
        :class:`~trainer_core.Trainer`."""

    def output_size(self, data: DataBundle) -> int:
        """How many values the model outputs per sample (or per position): the
        ``num_classes`` a model factory is given."""
        return len(data.classes)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss, a 0-dim tensor that carries the graph."""
        raise NotImplementedError

    def new_sums(self, device: torch.device) -> torch.Tensor:
        """Zeros to accumulate one evaluation's sums in (``float64``, on ``device``)."""
        raise NotImplementedError

    def add_sums(self, sums: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a validation batch to ``sums`` in place, on the device (no host sync)."""
        raise NotImplementedError

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        """The evaluation's metrics from the sums over every batch and rank,
        ``val/loss`` first."""
        raise NotImplementedError

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """What the model's ``outputs`` mean as a prediction: class or label
        probabilities, values in the targets' units, next-token probabilities."""
        raise NotImplementedError

    def exported(self, outputs: torch.Tensor) -> torch.Tensor:
        """What an exported model returns for the model's ``outputs``: the outputs
        themselves, unless the task trains on a transformed target (regression's
        scaling, undone here so the file gives values in the targets' units)."""
        return outputs

    def describe(self, prediction: torch.Tensor, names: list[str], top_k: int) -> dict[str, Any]:
        """One sample's :meth:`predict` row as JSON-ready data for ``trainer predict --json``."""
        raise NotImplementedError

    def format(self, described: Mapping[str, Any]) -> list[str]:
        """Console lines for one :meth:`describe` result."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What the task learned from the data (statistics), saved in checkpoints."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (from a checkpoint)."""


# Names that read as "lower is better" when no task says otherwise.
_LOWER_IS_BETTER = re.compile(r"loss|err|mse|mae|perplexity|bits")


def metric_mode(metric: str, task: Task | None = None) -> Mode:
    """Whether a higher (``max``) or lower (``min``) ``metric`` is better: what the
    task says of its own metrics; otherwise ``min`` for names with ``loss``,
    ``err``, ``mse``, ``mae``, ``perplexity`` or ``bits`` in them, else ``max``."""
    if task is not None and metric in task.modes:
        return task.modes[metric]
    return "min" if _LOWER_IS_BETTER.search(metric) else "max"


def task_name(configured: str | None, data: DataBundle) -> str:
    """The task a run trains: ``--task`` / ``[task]``, else the dataset's, else classification."""
    return configured or data.task or DEFAULT_TASK


def load_task(name: str, options: Mapping[str, Any] | None = None) -> Task:
    """The task registered as ``name``, built with ``options`` (coerced by annotation)."""
    from trainer_core.entrypoints import TASKS, Registry
    from trainer_core.options import bind_options

    entry = Registry(TASKS).get(name)
    factory = entry.load()
    kwargs = bind_options(factory, options or {}, owner="task")
    try:
        task = factory(**kwargs)
    except ValueError as exc:
        raise UsageError(f"task '{name}': {exc}") from None
    if not isinstance(task, Task):
        raise UsageError(f"task '{name}' ({entry.describe()}) is {type(task).__name__}, not a trainer_core.Task")
    task.name = name
    return task


def check_fit(task: Task, data: DataBundle, dataset: str) -> None:
    """Refuse, in one line, a dataset whose targets do not fit ``task``, or with an empty split."""
    for split in ("train", "val"):
        if len(getattr(data, split)) == 0:
            raise UsageError(f"the dataset's {split} split is empty")
    try:
        task.check(data)
    except ValueError as exc:
        hint = (f"; dataset '{dataset}' is for task '{data.task}': use --task {data.task}"
                if data.task and data.task != task.name else "")
        raise UsageError(f"task '{task.name}' cannot train on dataset '{dataset}': {exc}{hint}") from None
