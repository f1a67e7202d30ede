"""The hand-written loop of ``overhead.py`` through Lightning's ``Trainer``, for comparison.

Lightning is optional: it is not a dependency of this project, nothing here
imports it until :func:`with_lightning` runs, and :func:`lightning_available`
says whether it is installed.  Lightning gets the very batches the
hand-written loop sees (in-memory tensors indexed in the trainer's epoch
order, handed over as a plain re-iterable, not a per-sample ``DataLoader``,
so that collation is not timed), the same model, SGD and loss, and so ends
with the same weights; what differs is the framework around the step.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn

from trainer_core.data import DataBundle, TensorSplit, epoch_order

if TYPE_CHECKING:
    import lightning.pytorch as pl


def lightning_available() -> bool:
    """Whether ``lightning`` is installed (without importing it)."""
    return importlib.util.find_spec("lightning") is not None


class Batches:
    """One split in the hand-written loop's batches; a re-iterable with a length.

    :param order: gives the sample order when an iteration starts (training:
        the current epoch's, as Lightning may call ``iter`` once more than it
        has epochs); ``None``: contiguous slices in split order (evaluation).
    """

    def __init__(self, split: TensorSplit, batch_size: int, order: Callable[[], torch.Tensor] | None) -> None:
        self.split, self.batch_size, self.order = split, batch_size, order

    def __len__(self) -> int:
        return -(-len(self.split.targets) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.split.inputs, self.split.targets
        order = self.order() if self.order is not None else None
        for first in range(0, len(y), self.batch_size):
            if order is None:
                yield x[first : first + self.batch_size], y[first : first + self.batch_size]
            else:
                index = order[first : first + self.batch_size]
                yield x[index], y[index]


@functools.cache
def _lightning_classes() -> tuple[type[pl.LightningModule], type[pl.Callback]]:
    """The Lightning module and the clock, defined once Lightning is imported."""
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        """``model`` trained like the hand-written loop; evaluated like the seed."""

        def __init__(self, model: nn.Module, lr: float, log_loss: bool) -> None:
            super().__init__()
            self.model, self.lr, self.log_loss = model, lr, log_loss
            self.criterion = nn.CrossEntropyLoss()
            self.correct = 0

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            images, labels = batch
            loss = self.criterion(self.model(images), labels)
            if self.log_loss:
                self.log("train/loss", loss)
            return loss

        def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
            images, labels = batch
            self.correct += (self.model(images).argmax(1) == labels).sum().item()  # the seed's evaluation

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.model.parameters(), lr=self.lr)

    class EpochClock(pl.Callback):
        """Seconds of the latest epoch's training phase (validation runs inside the epoch)."""

        def __init__(self) -> None:
            self.started, self.seconds = 0.0, 0.0

        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.started = time.perf_counter()

        def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.seconds = time.perf_counter() - self.started

    return Module, EpochClock


def with_lightning(model: nn.Module, data: DataBundle, batch_size: int, *, epochs: int, lr: float, seed: int,
                   per_step_logging: bool, folder: Path) -> tuple[float, float]:
    """Train ``model`` with Lightning's ``Trainer`` exactly like ``overhead.hand_written``.

    SGD (``lr``, no momentum), cross-entropy, the trainer's epoch order, the
    validation split evaluated after each epoch.  ``per_step_logging`` off:
    everything Lightning can switch off is off; on: the loss is logged every
    step to Lightning's TensorBoard logger under ``folder`` (written every 50
    steps, like our tensorboard plugin).

    :returns: ``(steady, total)``: seconds per training step of the last
        epoch's training phase, and of the whole run (from before the
        ``Trainer`` is built to after ``fit``).
    """
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    # Lightning's console chatter (device summary, tips, few-workers warnings) is not what we compare.
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    Module, EpochClock = _lightning_classes()
    started = time.perf_counter()
    module, clock = Module(model, lr, per_step_logging), EpochClock()
    train = Batches(data.train, batch_size, lambda: epoch_order(len(data.train.targets), seed, module.current_epoch + 1))
    val = Batches(data.val, batch_size, None)
    logging_options: dict[str, Any] = (
        {"logger": TensorBoardLogger(folder, name="lightning"), "log_every_n_steps": 50} if per_step_logging
        else {"logger": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             deterministic=False, default_root_dir=folder, callbacks=[clock], **logging_options)
        trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    total = time.perf_counter() - started
    return clock.seconds / len(train), total / trainer.global_step
