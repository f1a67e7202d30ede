"""Early stopping: end the run when a monitored metric stops improving."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Literal, Mapping

from trainer_core import UsageError, check_monitor, check_saved_state, hookimpl, metric_mode, resolve_monitor

if TYPE_CHECKING:
    import torch

    from trainer_core import Trainer

log = logging.getLogger("trainer_core.early_stopping")


class EarlyStopping:
    """Stops training when a validation metric has not improved for ``patience`` evaluations.

    Its counter and best value travel in checkpoints, so a resumed run keeps
    its patience.  With ``restore_best_weights`` the model ends the run with
    the weights of its best evaluation, whether the run stopped early or ran
    all its epochs, and they are evaluated again: that evaluation is the run's
    final one (``summary.json``'s ``final``; the last epoch's stays as ``last_epoch``).
    """

    def __init__(
        self,
        monitor: str | None = None,
        mode: Literal["auto", "min", "max"] = "auto",
        patience: int = 3,
        min_delta: float = 0.0,
        restore_best_weights: bool = False,
    ) -> None:
        """:param monitor: the evaluation metric to watch, e.g. ``val/loss`` or ``val/acc``;
            default: the task's headline metric (``val/acc`` for classification).
        :param mode: ``min`` (lower is better), ``max``, or ``auto``: what the task says of
            the metric (else ``min`` for losses and errors, ``max`` otherwise).
        :param patience: evaluations without improvement before the run stops.
        :param min_delta: the least change that counts as an improvement.
        :param restore_best_weights: load the best evaluation's weights when the run ends."""
        if patience < 1:
            raise ValueError(f"early-stopping.patience must be >= 1 (got {patience})")
        if not min_delta >= 0:  # also refuses NaN
            raise ValueError(f"early-stopping.min_delta must be >= 0 (got {min_delta})")
        if monitor == "":
            raise ValueError("early-stopping.monitor must name a metric, e.g. val/loss")
        # Resolved again in on_fit_start, where the task is known: a default monitor is its headline metric.
        self.monitor = monitor or ""
        self.mode: str = mode if mode != "auto" or not monitor else metric_mode(monitor)
        self._wanted = (monitor, mode)
        self.patience = patience
        self.min_delta = min_delta
        self.restore_best_weights = restore_best_weights
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None
        # A CPU copy taken only when the metric improves: costs one copy per improvement, none per step.
        self.best_weights: dict[str, torch.Tensor] | None = None

    def improved(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than ``min_delta`` (NaN never does)."""
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        self.monitor, self.mode = resolve_monitor(trainer, "early-stopping.monitor", *self._wanted)
        # By attribute, not by the name "checkpoint": a checkpoint plugin may be enabled under another name.
        restorers = [trainer.pm.get_name(p) for p in trainer.pm.get_plugins() if getattr(p, "restore_best", False) is True]
        if self.restore_best_weights and restorers:
            # Both would load "best" weights at the end, maybe of different epochs, and the
            # last one called would win: an order-dependent result, so refuse it.
            raise UsageError(
                f"early-stopping.restore_best_weights and {restorers[0]}.restore_best both restore weights when the run "
                f"ends; keep one: -o {restorers[0]}.restore_best=false, or leave early-stopping.restore_best_weights off"
            )

    @hookimpl
    def on_eval(self, trainer: Trainer, metrics: Mapping[str, float]) -> None:
        if trainer.state.restored is not None:
            return  # weights put back after training (no epoch to count)
        check_monitor("early-stopping.monitor", self.monitor, metrics)
        value = float(metrics[self.monitor])
        if self.improved(value):
            self.best, self.best_epoch, self.wait = value, trainer.state.epoch, 0
            if self.restore_best_weights:
                self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in trainer.model_weights().items()}
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = trainer.state.epoch
            trainer.request_stop(
                f"early-stopping: {self.monitor} did not improve for {self.wait} evaluation(s); "
                f"best {self.best:.6g} at epoch {self.best_epoch}"
            )

    @hookimpl(tryfirst=True)  # the best weights back before reporters (class-accuracy, tensorboard) read the model
    def on_fit_end(self, trainer: Trainer) -> None:
        if not self.restore_best_weights or self.best_epoch in (None, trainer.state.epoch):
            return  # nothing asked, nothing evaluated, or the final weights are the best ones
        if self.best_weights is None:  # resumed from a checkpoint saved without restore_best_weights
            trainer.echo(f"early-stopping: the weights of epoch {self.best_epoch} were not saved; keeping the final weights")
            return
        trainer.load_model_weights(self.best_weights)
        trainer.echo(f"early-stopping: restored the weights of epoch {self.best_epoch} ({self.monitor} {self.best:.6g})")
        # What the run reports (summary.json's final metrics, class-accuracy's table) is then the model it leaves.
        step = next((m["step"] for m in trainer.state.history if m.get("epoch") == self.best_epoch), None)
        if step is not None:  # (a resumed run's history always holds it, unless its checkpoint was tampered with)
            trainer.evaluate_restored(self.best_epoch, int(step), f"early-stopping's weights of epoch {self.best_epoch}")

    @hookimpl
    def plugin_state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "monitor": self.monitor,
            "mode": self.mode,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
        }
        if self.best_weights is not None:
            state["best_weights"] = self.best_weights
        return state

    @hookimpl
    def load_plugin_state(self, trainer: Trainer, state: dict[str, Any]) -> None:
        import torch

        check_saved_state(state, monitor=str, mode=str, best=(float, None), best_epoch=(int, None), wait=int)
        if (state["monitor"], state["mode"]) != (self.monitor, self.mode):
            # A different metric or direction makes the saved best meaningless: start afresh.
            log.warning(
                "early-stopping: the resumed run watched %s (%s), this one watches %s (%s); patience starts afresh",
                state["monitor"], state["mode"], self.monitor, self.mode,
            )
            return
        weights = state.get("best_weights")
        if self.restore_best_weights and weights is not None:  # loaded when the run ends: a misfit would fail only then
            model = trainer.model.state_dict()
            if not (isinstance(weights, dict) and weights.keys() == model.keys()
                    and all(isinstance(v, torch.Tensor) and v.shape == model[k].shape for k, v in weights.items())):
                raise ValueError("its 'best_weights' are not weights of this model")
        self.best, self.best_epoch, self.wait = state["best"], state["best_epoch"], state["wait"]
        if self.restore_best_weights:
            self.best_weights = weights
        if self.wait >= self.patience:  # the checkpoint was saved by a run this plugin had stopped
            trainer.request_stop(
                f"early-stopping: the run had already stopped ({self.monitor} did not improve for {self.wait} "
                f"evaluation(s)); raise -o early-stopping.patience to train on"
            )
