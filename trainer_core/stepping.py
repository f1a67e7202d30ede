"""The part of a training step that options change: the optimizer, mixed
precision, gradient accumulation, gradient clipping and skipping non-finite steps.

Kept out of the loop so the loop reads the same whichever options are on.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, ContextManager

import torch

from trainer_core import distributed
from trainer_core.config import RunConfig

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, c: torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
    "adam": lambda params, c: torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay),
    "adamw": lambda params, c: torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay),
}


def autocast_for(precision: str, device: torch.device) -> Callable[[], ContextManager[Any]]:
    """A factory of the forward pass's context: autocast for bf16/16, nothing for 32."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


def all_finite(loss: torch.Tensor) -> bool:
    """Whether ``loss`` is finite on every rank: the ranks of a distributed run
    skip a batch together (one host sync, and one all-reduce between ranks)."""
    finite = torch.isfinite(loss.detach()).to(torch.int32).reshape(1)
    return bool(distributed.all_reduce(finite, "min"))


class Stepper:
    """Backward pass and optimizer step for one batch.

    :param before_step: called (with ``optimizer=``) when gradients are complete
        and unscaled, just before clipping and the step; ``None`` for no call.
    :param average_gradients: averages the gradients over the ranks, for a step
        whose last batch was skipped when that batch was to average them (ranks
        that accumulate all-reduce in the batch that steps); ``None`` when the
        ranks do not defer it.
    """

    def __init__(self, config: RunConfig, device: torch.device, optimizer: torch.optim.Optimizer,
                 before_step: Callable[..., Any] | None, average_gradients: Callable[[], None] | None = None) -> None:
        self.optimizer = optimizer
        self.accumulate = config.accumulate_grad_batches
        self.clip = config.clip_grad_norm
        self.skip_nonfinite = config.nonfinite == "skip"
        self.before_step = before_step
        self.average_gradients = average_gradients
        # Gradient scaling keeps small fp16 gradients from flushing to zero; bf16 does not need it.
        self.scaler = torch.amp.GradScaler(device.type) if config.precision == "16" else None
        self.waiting = 0  # batches whose gradients are accumulated but not yet stepped
        self.skipped = 0
        self.stepped = False  # whether the last call ended in an optimizer step

    def will_step(self, last_batch: bool) -> bool:
        """Whether the next batch ends in an optimizer step (unless skipped for a non-finite loss)."""
        return self.waiting + 1 >= self.accumulate or last_batch

    def backward_and_step(self, loss: torch.Tensor, last_batch: bool, trainer: Any) -> bool:
        """Accumulate ``loss``'s gradients; step when enough batches are in (or the
        epoch ends).  Return ``False`` when the batch was skipped for a
        non-finite loss (only with ``nonfinite = "skip"``)."""
        finite = not self.skip_nonfinite or all_finite(loss)
        if finite:
            if self.accumulate > 1:
                loss = loss / self.accumulate
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            self.waiting += 1
        else:
            self.skipped += 1
        # A skipped last batch still steps what earlier batches accumulated: nothing carries into the next epoch.
        self.stepped = bool(self.waiting) and (self.waiting >= self.accumulate or last_batch)
        if not self.stepped:
            return finite
        self.waiting = 0
        if not finite and self.average_gradients is not None:
            self.average_gradients()
        optimizer = self.optimizer
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if self.before_step is not None:
            self.before_step(trainer=trainer, optimizer=optimizer)
        if self.clip:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], self.clip)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return finite

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.skipped = state.get("skipped", 0)
