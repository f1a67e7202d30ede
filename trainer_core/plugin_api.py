"""What plugins may read and call on the trainer they are given.

Kept apart from the loop (:mod:`trainer_core.trainer`) so that each reads in
one sitting; :class:`~trainer_core.Trainer` is both.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import pluggy
    import torch
    from torch import nn

    from trainer_core import distributed
    from trainer_core.config import RunConfig
    from trainer_core.data import Batches, DataBundle
    from trainer_core.lossmeter import LossMeter
    from trainer_core.rundir import RunDir
    from trainer_core.state import TrainState
    from trainer_core.stepping import Stepper
    from trainer_core.strategy import Strategy
    from trainer_core.task import Task


class PluginAPI:
    """The attributes and methods of a running trainer that plugins use.

    :ivar config: the run's resolved settings (:class:`~trainer_core.RunConfig`).
    :ivar state: progress (:class:`~trainer_core.TrainState`): epoch, step, metrics...
    :ivar model: the model being trained (the plain module, never a wrapper).
    :ivar optimizer: the optimizer (``None`` before ``on_fit_start``).
    :ivar data: the dataset (:class:`~trainer_core.DataBundle`).
    :ivar task: the task (:class:`~trainer_core.Task`): its ``name``, ``headline`` metric...
    :ivar device: the device this process trains on.
    :ivar pm: the plugin manager.
    :ivar train_batches: the training batches; ``len()`` is the steps per epoch.
    :ivar rank: this process's rank (0 in one process).
    :ivar world_size: the number of processes (1 in one process).
    :ivar distributed: whether this run has several processes.
    :ivar quiet: ``True`` silences :meth:`echo` (``trainer run -q``).
    :ivar checkpoint_files: the run's named checkpoints (:meth:`name_checkpoint`), by role, relative to the run folder.
    :ivar strategy: how the run uses its processes: its ``name`` (``single``,
        ``ddp``, ``fsdp``) and ``shards_parameters`` (whether each rank holds only
        part of each parameter: read them through :meth:`full_tensor`).
    """

    config: RunConfig
    state: TrainState
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    stepper: Stepper | None
    data: DataBundle
    task: Task
    device: torch.device
    pm: pluggy.PluginManager
    strategy: Strategy
    losses: LossMeter
    train_batches: Batches
    run_dir: RunDir | None
    rank: int
    world_size: int
    distributed: bool
    quiet: bool
    checkpoint_files: dict[str, str]

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and prints (rank zero)."""
        return self.rank == 0

    def echo(self, message: str) -> None:
        """Print ``message``, a line for the person watching the run, on the main
        process only, unless the run is quiet (``trainer run -q``): plugins print
        their notices through it, so ``-q`` silences them and no rank repeats rank zero's."""
        if self.is_main and not self.quiet:
            print(message, flush=True)

    @property
    def run_path(self) -> Path | None:
        """The run folder, or ``None`` when this run writes no files."""
        return self.run_dir.path if self.run_dir is not None else None

    @property
    def lr(self) -> float:
        """The learning rate of the optimizer's first parameter group."""
        return float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else self.config.lr

    #: What ``summary.json``'s ``status`` says of a run a plugin stopped (:meth:`request_stop`'s ``status``).
    stop_status: str = "stopped"

    def name_checkpoint(self, role: Literal["best", "last"], path: Path | None) -> None:
        """Name the file that holds the run's ``best`` or ``last`` checkpoint (``None``: none now).
        ``summary.json`` lists the named files under ``checkpoints``, relative to the run folder (a
        file outside it is not listed), and ``trainer eval``/``predict``/``export --checkpoint RUN_FOLDER``
        take the best one.  The checkpoint plugin names its files after each save and on resume."""
        run = self.run_path.resolve() if self.run_path is not None else None
        where = Path(path).resolve() if path is not None else None
        if run is None or where is None or not where.is_relative_to(run):
            self.checkpoint_files.pop(role, None)
        else:
            self.checkpoint_files[role] = where.relative_to(run).as_posix()

    def request_stop(self, reason: str, *, status: Literal["stopped", "pruned"] = "stopped") -> None:
        """Ask the loop to stop after the current step (or at the end of the current epoch's
        evaluation).  In a run of several processes every rank stops at the same step: the
        request takes effect at the next training-loss log or epoch end, whichever rank asked.

        :param reason: why, in words (``summary.json``'s ``stop_reason``).
        :param status: what ``summary.json``'s ``status`` says when this request ends the run:
            ``stopped``, or ``pruned`` for a sweep's trial stopped as hopeless (``trainer sweep``)."""
        if status not in ("stopped", "pruned"):
            raise ValueError(f"request_stop(status={status!r}): a stop's status is 'stopped' or 'pruned'")
        self.stop_status = status
        self.strategy.request_stop(self.state, reason)

    def all_reduce(self, tensor: torch.Tensor, op: distributed.ReduceOp = "sum") -> torch.Tensor:
        """Combine ``tensor`` in place across the ranks (``sum``, ``max`` or ``min``) and
        return it; in one process it is returned as is.  Every rank must call it at the
        same point: a plugin reduces what it gathered in ``on_eval_batch`` in ``collect_eval_metrics``."""
        return self.strategy.all_reduce(tensor, op)

    def barrier(self) -> None:
        """Wait until every rank gets here (nothing in one process)."""
        self.strategy.barrier()
