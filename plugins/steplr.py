"""Step learning-rate decay: multiply the learning rate by ``gamma`` every ``step_size`` epochs (or steps)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from trainer_core import check_saved_state, hookimpl, unused_hooks

if TYPE_CHECKING:
    import torch

    from trainer_core import Trainer


class StepLR:
    """Decays the learning rate of every parameter group by ``gamma`` every ``step_size`` epochs.

    The seed's ``lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)``,
    saved in checkpoints so a resumed run continues the same schedule.
    """

    def __init__(self, step_size: int = 7, gamma: float = 0.1, interval: Literal["epoch", "step"] = "epoch") -> None:
        """:param step_size: epochs (or steps, see ``interval``) between two decays.
        :param gamma: factor the learning rate is multiplied by at each decay.
        :param interval: count ``epoch``s (the seed's schedule) or optimizer ``step``s
            (with gradient accumulation, one per accumulated group of batches)."""
        if step_size < 1:
            raise ValueError(f"steplr.step_size must be >= 1 (got {step_size})")
        if not gamma > 0:  # also refuses NaN
            raise ValueError(f"steplr.gamma must be > 0 (got {gamma})")
        if interval not in ("epoch", "step"):
            raise ValueError(f"steplr.interval must be epoch or step (got {interval!r})")
        self.step_size = step_size
        self.gamma = gamma
        self.interval = interval
        self.scheduler: torch.optim.lr_scheduler.StepLR | None = None
        if interval == "epoch":
            unused_hooks(self, "on_batch_end")  # a per-epoch schedule costs nothing per step

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        import torch

        assert trainer.optimizer is not None
        self.scheduler = torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=self.step_size, gamma=self.gamma)

    @hookimpl
    def on_batch_end(self, optimizer_stepped: bool) -> None:
        # Batches that end in no optimizer step (gradient accumulation, a skipped
        # non-finite loss) don't advance a per-step schedule.
        if optimizer_stepped and self.scheduler is not None:
            self.scheduler.step()  # after optimizer.step(), as torch expects

    @hookimpl
    def on_epoch_end(self) -> None:
        if self.interval == "epoch" and self.scheduler is not None:
            self.scheduler.step()

    @hookimpl
    def plugin_state_dict(self) -> dict[str, Any] | None:
        return {"scheduler": self.scheduler.state_dict()} if self.scheduler is not None else None

    @hookimpl
    def load_plugin_state(self, state: dict[str, Any]) -> None:
        assert self.scheduler is not None
        check_saved_state(state, scheduler=dict)
        saved = state["scheduler"]
        # torch takes any values and fails at a later step: the position and rates are checked now.
        check_saved_state(saved, step_size=int, gamma=float, last_epoch=int, _step_count=int, base_lrs=[float], _last_lr=[float])
        if (saved["step_size"], saved["gamma"]) != (self.step_size, self.gamma):
            # Options changed on resume: keep the position in the schedule, apply the new shape.
            saved = {**saved, "step_size": self.step_size, "gamma": self.gamma}
        self.scheduler.load_state_dict(saved)
