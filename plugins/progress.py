"""Console progress: a live bar on a terminal, one line per epoch otherwise."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, Literal, Mapping, TextIO

from trainer_core import hookimpl, metric_mode, rank_zero_only, unused_hooks

if TYPE_CHECKING:
    from trainer_core import Trainer


@rank_zero_only  # console output only: the other ranks of a distributed run need not call it at all
class Progress:
    """Shows training progress and the final result on the console.

    On by default; turn it off with ``--quiet`` or ``--plugins no:progress``.
    """

    def __init__(self, bar: Literal["auto", "on", "off"] = "auto", refresh_per_second: float = 10.0) -> None:
        """:param bar: a live progress bar: ``auto`` when the output is a terminal.
        :param refresh_per_second: most bar redraws per second."""
        if refresh_per_second <= 0:
            raise ValueError(f"progress.refresh_per_second must be > 0 (got {refresh_per_second})")
        self.bar = bar
        self.interval = 1.0 / refresh_per_second
        self.stream: TextIO = sys.stdout
        self._live = False  # drawing the bar (main process, a terminal or bar=on)
        if bar == "off" or (bar == "auto" and not self.stream.isatty()):
            unused_hooks(self, "on_batch_end")  # no bar to draw: plain lines cost nothing per step
        self._next_draw = 0.0
        self._loss: float | None = None  # the latest logged training loss
        self._steps_per_epoch = 0
        self._started = 0.0
        self._first_step = 0  # the step this run started (or resumed) from, for the rate and time left

    def _print(self, line: str) -> None:
        if self._live:
            self.stream.write("\r\x1b[2K")
        self.stream.write(line + "\n")
        self.stream.flush()

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        self._live = trainer.is_main and (self.bar == "on" or (self.bar == "auto" and self.stream.isatty()))
        c, data = trainer.config, trainer.data
        self._steps_per_epoch = len(trainer.train_batches)
        self._started = time.monotonic()
        self._first_step = trainer.state.step
        if trainer.is_main:
            self._print(
                f"training {c.model} on {c.dataset}: {len(data.train)} train / {len(data.val)} validation samples, "
                f"{_count(c.epochs, 'epoch')} of {_count(self._steps_per_epoch, 'step')}, batch {c.batch_size}, "
                f"{c.optimizer} lr {c.lr:g}, device {trainer.device}"
            )

    @hookimpl
    def on_train_log(self, metrics: Mapping[str, float]) -> None:
        self._loss = metrics["train/loss"]

    @hookimpl
    def on_batch_end(self, trainer: Trainer) -> None:
        if not self._live:
            return
        now = time.monotonic()
        if now < self._next_draw:
            return
        self._next_draw = now + self.interval
        state, c = trainer.state, trainer.config
        done = state.step - self._first_step
        elapsed = now - self._started
        total = c.epochs * self._steps_per_epoch - self._first_step
        rate = done * c.batch_size / elapsed if elapsed > 0 else 0.0
        left = (total - done) * elapsed / done if done else 0.0
        filled = int(20 * state.batch_idx / self._steps_per_epoch)
        loss = f"loss {self._loss:.4f}  " if self._loss is not None else ""
        self.stream.write(
            f"\r\x1b[2Kepoch {state.epoch}/{c.epochs} [{'#' * filled}{'.' * (20 - filled)}] "
            f"{state.batch_idx}/{self._steps_per_epoch}  {loss}{rate:,.0f} samples/s  {_clock(left)} left"
        )
        self.stream.flush()

    @hookimpl
    def on_eval(self, trainer: Trainer, metrics: Mapping[str, Any]) -> None:
        if trainer.is_main and trainer.state.restored is None:  # (restored weights: told at the end)
            self._print(
                f"epoch {metrics['epoch']}/{trainer.config.epochs}  train loss {metrics['train/loss']:.4f}  "
                f"val loss {metrics['val/loss']:.4f}{_headline(trainer, metrics, '  ')}  "
                f"({_clock(time.monotonic() - self._started)})"
            )

    @hookimpl
    def on_fit_end(self, trainer: Trainer) -> None:
        if not trainer.is_main or not trainer.state.history:
            return
        final, metric = trainer.state.metrics, trainer.task.headline
        pick = min if metric_mode(metric, trainer.task) == "min" else max
        best = pick(trainer.state.history, key=lambda m: m[metric])
        final_text = (f"{_headline(trainer, final, ' ')} (loss {final['val/loss']:.4f})" if metric != "val/loss"
                      else f" val loss {final['val/loss']:.4f}")
        restored = trainer.state.restored
        which = f" (the restored weights of epoch {restored['epoch']})" if restored is not None else ""
        self._print(f"done in {_clock(time.monotonic() - self._started)}: final{which}{final_text}; "
                    f"best {_value(metric, best[metric])} at epoch {best['epoch']}")

    @hookimpl
    def on_exception(self, trainer: Trainer) -> None:
        if self._live:
            self.stream.write("\n")
            self.stream.flush()


def _headline(trainer: Trainer, metrics: Mapping[str, Any], space: str) -> str:
    """The task's headline metric, unless it is the loss already shown: ``val acc 97.50%``."""
    metric = trainer.task.headline
    return "" if metric == "val/loss" else f"{space}{metric.replace('/', ' ')} {_value(metric, metrics[metric])}"


def _value(metric: str, value: float) -> str:
    return f"{100 * value:.2f}%" if metric.endswith("/acc") else f"{value:.4f}"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


def _count(number: int, noun: str) -> str:
    """``1 epoch``, ``2 epochs``."""
    return f"{number} {noun}{'' if number == 1 else 's'}"
