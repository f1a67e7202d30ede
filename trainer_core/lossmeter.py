"""The training loss, kept on the device between logs and read back once per
logging interval: the loop's only host sync during training."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from trainer_core.state import TrainState
    from trainer_core.strategy import Strategy


class LossMeter:
    """Batch losses of the current logging interval, and the epoch's totals.

    A checkpoint written mid-interval carries the interval's part so far
    (:meth:`state_dict`), so a resumed run logs the same intervals as one never
    stopped.
    """

    def __init__(self) -> None:
        self._losses: list[torch.Tensor] = []  # detached batch losses since the last log
        self._sizes: list[int] = []
        self._carried_loss, self._carried_samples = 0.0, 0  # an interval's part from before a resume
        self.epoch_loss, self.epoch_samples = 0.0, 0  # this epoch's loss sum and samples, already read back

    def add(self, loss: torch.Tensor, size: int) -> None:
        """Count a batch's detached mean ``loss`` over ``size`` samples."""
        self._losses.append(loss)
        self._sizes.append(size)

    def start_epoch(self) -> None:
        self.epoch_loss, self.epoch_samples = 0.0, 0

    @property
    def pending(self) -> bool:
        """Whether the interval holds anything not yet logged."""
        return bool(self._losses or self._carried_samples)

    def loss_sum(self) -> float:
        """The interval's loss summed over its samples (one read-back)."""
        if not self._losses:
            return self._carried_loss
        # Weighted and summed in double precision on the host.
        losses = torch.stack(self._losses).tolist()
        return self._carried_loss + math.fsum(loss * size for loss, size in zip(losses, self._sizes))

    def samples(self) -> int:
        return self._carried_samples + sum(self._sizes)

    def take_interval(self, strategy: Strategy, state: TrainState) -> tuple[float, int]:
        """The interval's loss sum and samples over every rank, added to the
        epoch's; the interval starts afresh."""
        total, samples = self.loss_sum(), self.samples()
        if strategy.distributed:  # the part carried from a checkpoint is on every rank: count it once
            reduced = strategy.agree(state, total - self._carried_loss, samples - self._carried_samples)
            total, samples = self._carried_loss + reduced[0], self._carried_samples + int(reduced[1])
        self._losses.clear()
        self._sizes.clear()
        self._carried_loss, self._carried_samples = 0.0, 0
        self.epoch_loss += total
        self.epoch_samples += samples
        return total, samples

    def epoch_mean(self) -> float:
        """The epoch's mean training loss so far (NaN before its first log)."""
        return self.epoch_loss / self.epoch_samples if self.epoch_samples else math.nan

    def pending_over_ranks(self, strategy: Strategy) -> list[float]:
        """The interval's loss sum and samples so far, over every rank (a collective:
        every rank calls it), for :meth:`state_dict`: a mid-interval checkpoint must
        carry every rank's part, which the resumed run counts once."""
        total, samples = self.loss_sum(), self.samples()
        if strategy.distributed:
            own = torch.tensor([total - self._carried_loss, samples - self._carried_samples], dtype=torch.float64,
                               device=strategy.device)
            reduced = strategy.all_reduce(own).tolist()
            total, samples = self._carried_loss + reduced[0], self._carried_samples + int(reduced[1])
        return [total, samples]

    def state_dict(self, pending: list[float] | None = None) -> dict[str, Any]:
        """:param pending: :meth:`pending_over_ranks` (in one process, this meter's own)."""
        return {"epoch_totals": [self.epoch_loss, self.epoch_samples],
                "pending": pending if pending is not None else [self.loss_sum(), self.samples()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch_loss, self.epoch_samples = state["epoch_totals"]
        self._losses, self._sizes = [], []
        self._carried_loss, self._carried_samples = state["pending"]
