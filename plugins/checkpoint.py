"""Best-model checkpointing: keep the best k checkpoints by a monitored metric
and ``last.pt`` to resume from, and restore the best weights at the end."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator, Literal, Mapping

from trainer_core import (CHECKPOINT_FOLDER, LAST_CHECKPOINT, UsageError, check_monitor, check_saved_state, hookimpl,
                          metric_mode, remove_checkpoint, resolve_monitor, unused_hooks)

if TYPE_CHECKING:
    from trainer_core import Trainer

log = logging.getLogger("trainer_core.checkpoint")

class Checkpoint:
    """Saves ``last.pt`` after every epoch and the best ``save_top_k`` checkpoints by ``monitor``.

    Files go to ``<run dir>/checkpoints/``: ``last.pt`` (what ``--resume``
    continues from) and ``best-epoch003-val_acc0.9861.pt``.  Each holds the
    model, the optimizer, every plugin's state, progress, RNG states and the
    config.  At the end of the run the best weights are loaded into the model
    (``restore_best``), as the seed's ``best_model_wts`` did by hand, and
    evaluated: that evaluation is the run's final one (the last epoch's is kept
    in ``summary.json`` as ``last_epoch``).
    """

    def __init__(
        self,
        monitor: str | None = None,
        mode: Literal["auto", "max", "min"] = "auto",
        save_top_k: int = 1,
        every_n_steps: int = 0,
        restore_best: bool = True,
        dirpath: Path | None = None,
    ) -> None:
        """:param monitor: the metric that ranks checkpoints (``trainer run`` prints them; e.g. ``val/loss``);
            default: the task's headline metric (``val/acc`` for classification).
        :param mode: ``max`` or ``min`` is better; ``auto``: what the task says of the metric
            (else ``min`` for losses and errors, ``max`` otherwise).
        :param save_top_k: best checkpoints to keep (0: none, -1: all).
        :param every_n_steps: also write ``last.pt`` every this many training steps within an epoch (0: off).
        :param restore_best: load the best checkpoint's weights into the model when training ends,
            and report their evaluation as the run's final one.
        :param dirpath: folder for the files (default: the run folder's ``checkpoints``)."""
        if monitor == "":
            raise ValueError("checkpoint.monitor must name a metric (e.g. val/acc)")
        if save_top_k < -1:
            raise ValueError(f"checkpoint.save_top_k must be >= -1, -1 for all (got {save_top_k})")
        if every_n_steps < 0:
            raise ValueError(f"checkpoint.every_n_steps must be >= 0, 0 for off (got {every_n_steps})")
        # Resolved again in on_fit_start, where the task is known: a default monitor is its headline metric.
        self.monitor = monitor or ""
        self.mode: str = mode if mode != "auto" or not monitor else metric_mode(monitor)
        self._wanted = (monitor, mode)
        self.save_top_k = save_top_k
        self.every_n_steps = every_n_steps
        self.restore_best = restore_best
        self.dirpath = dirpath
        self.folder: Path | None = None
        # The kept best checkpoints, best first: {"file", "score", "epoch", "step"}.
        self.kept: list[dict[str, Any]] = []
        self._score: float | None = None  # the monitored value of the epoch's evaluation
        self._saved_step = -1  # the step ``last.pt`` holds
        self._due = False  # a mid-epoch save waits for the next optimizer step
        self._unrecorded_up_to: int | None = None  # a resumed epoch whose unlisted best files go (_remove_unrecorded)
        if not every_n_steps:
            unused_hooks(self, "on_batch_end")  # no mid-epoch saves: nothing to do per step

    # -- start-up ------------------------------------------------------------

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        folder = self.dirpath or (trainer.run_path / CHECKPOINT_FOLDER if trainer.run_path is not None else None)
        if folder is None:
            raise UsageError("checkpoint: this run writes no run folder; set -o checkpoint.dirpath=FOLDER")
        self.folder = Path(folder)
        self.monitor, self.mode = resolve_monitor(trainer, "checkpoint.monitor", *self._wanted)

    # -- when to save --------------------------------------------------------

    @hookimpl
    def on_eval(self, metrics: Mapping[str, float]) -> None:
        check_monitor("checkpoint.monitor", self.monitor, metrics)
        self._score = float(metrics[self.monitor])

    @hookimpl(trylast=True)
    def on_batch_end(self, trainer: Trainer, optimizer_stepped: bool) -> None:
        state = trainer.state
        self._due = self._due or state.step % self.every_n_steps == 0
        # Gradients being accumulated are not in a checkpoint: save right after an optimizer
        # step (not every k-th batch: a batch skipped for a non-finite loss shifts the steps).
        # The epoch's last batch is saved at on_epoch_end, after its evaluation:
        # a checkpoint there would resume past an evaluation that never happened.
        if self._due and optimizer_stepped and state.batch_idx < len(trainer.train_batches):
            self._save(trainer, best=None)

    @hookimpl(trylast=True)
    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        score, self._score = self._score, None
        if score is None:
            return  # no evaluation this epoch: nothing to rank
        if not math.isfinite(score):
            log.warning("checkpoint: %s is %s in epoch %d; not saving over the previous checkpoints", self.monitor, score, epoch)
            return
        self._save(trainer, best=score if self._ranks_among_best(score) else None)

    # A wrapper runs before every other on_fit_end: the training state is saved before any plugin
    # swaps in other weights, and the best weights are back before reporters read the model.
    @hookimpl(wrapper=True)
    def on_fit_end(self, trainer: Trainer) -> Generator[None, list[None], list[None]]:
        self._remove_unrecorded()
        state = trainer.state
        # Stopped part-way (a signal, a plugin) in training or before the epoch's evaluation:
        # keep the progress.  An epoch that ended with a non-finite score stays unsaved.
        cut_short = state.batch_idx < len(trainer.train_batches) or state.metrics.get("epoch") != state.epoch
        if cut_short and state.step not in (self._saved_step, 0):
            self._save(trainer, best=None)
        if self.restore_best and self.kept and self.folder is not None:
            best = self.kept[0]
            path = self.folder / best["file"]
            trainer.restore_weights(path)
            trainer.echo(f"checkpoint: restored the best weights ({self.monitor} {best['score']:.4f}, "
                         f"epoch {best['epoch']}) from {path}")
            # What the run reports (summary.json's final metrics, class-accuracy's table, TensorBoard's
            # restored/ curves) is then the model it leaves, not the last epoch's.
            trainer.evaluate_restored(best["epoch"], best["step"], str(path))
        return (yield)

    # -- saving --------------------------------------------------------------

    def _ranks_among_best(self, score: float) -> bool:
        if self.save_top_k == 0:
            return False
        if self.save_top_k == -1 or len(self.kept) < self.save_top_k:
            return True
        return self._better(score, self.kept[-1]["score"])

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b

    def _save(self, trainer: Trainer, best: float | None) -> None:
        """Write ``last.pt`` (and a best checkpoint when ``best`` is its score); drop evicted best files."""
        assert self.folder is not None
        self._remove_unrecorded()
        if not trainer.weights_finite():
            log.warning("checkpoint: the weights hold NaN or infinity at step %d; not saving over the previous checkpoints",
                        trainer.state.step)
            return
        state = trainer.state
        evicted: list[str] = []
        files = [LAST_CHECKPOINT]
        if best is not None:
            slug = re.sub(r"[^0-9A-Za-z]+", "_", self.monitor)
            slug += "-" if slug[-1].isdigit() else ""  # val/acc/3 at 0.97: val_acc_3-0.9700, not val_acc_30.9700
            name = f"best-epoch{state.epoch:03d}-{slug}{best:.4f}.pt"
            entry = {"file": name, "score": best, "epoch": state.epoch, "step": state.step}
            # Ties keep the older checkpoint ahead (a stable sort on "better").
            kept = [k for k in self.kept if k["file"] != name] + [entry]
            kept.sort(key=lambda k: -k["score"] if self.mode == "max" else k["score"])
            if self.save_top_k != -1:
                evicted = [k["file"] for k in kept[self.save_top_k:]]
                kept = kept[: self.save_top_k]
            self.kept = kept  # before the state is taken, so the files record themselves
            files.insert(0, name)
        self._saved_step, self._due = state.step, False
        trainer.save_checkpoint(*(self.folder / name for name in files))  # (every rank takes part)
        trainer.name_checkpoint("last", self.folder / LAST_CHECKPOINT)
        self._name_best(trainer)
        if trainer.is_main:
            for name in evicted:
                remove_checkpoint(self.folder / name)

    def _name_best(self, trainer: Trainer) -> None:
        """Tell the run which file is its best (summary.json names it; eval/predict/export take it)."""
        assert self.folder is not None
        trainer.name_checkpoint("best", self.folder / self.kept[0]["file"] if self.kept else None)

    # -- state ---------------------------------------------------------------

    @hookimpl
    def plugin_state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "mode": self.mode, "kept": [dict(k) for k in self.kept]}

    @hookimpl
    def load_plugin_state(self, trainer: Trainer, state: dict[str, Any]) -> None:
        check_saved_state(state, monitor=str, mode=str, kept=list)
        self._saved_step = trainer.state.step
        if (state["monitor"], state["mode"]) != (self.monitor, self.mode):
            log.warning(
                "checkpoint: the resumed run ranked by %s (%s), this one by %s (%s); earlier best checkpoints are kept "
                "on disk but no longer ranked", state["monitor"], state["mode"], self.monitor, self.mode,
            )
            return
        assert self.folder is not None
        recorded = [k for k in state["kept"] if _is_kept_entry(k)]
        if len(recorded) != len(state["kept"]):
            log.warning("checkpoint: the resumed state lists %d kept file(s) that are not best checkpoints of this "
                        "plugin (a file name in this folder, a score, an epoch); they are ignored",
                        len(state["kept"]) - len(recorded))
        # Files deleted by hand (or a resume into another folder) are not ranked against.
        self.kept = [k for k in recorded if (self.folder / k["file"]).is_file()]
        self._name_best(trainer)
        if self.dirpath is None and trainer.is_main and len(recorded) == len(state["kept"]):
            # Only on a kept list that is all ours, and only once the resumed run saves or ends
            # (_remove_unrecorded): a resume refused after this leaves the folder as it was.
            self._unrecorded_up_to = trainer.state.epoch

    def _remove_unrecorded(self) -> None:
        """Remove the best checkpoints of this run's own folder, up to the resumed epoch, that
        the resumed state does not list: evicted by a save that was cut before it deleted them."""
        epoch, self._unrecorded_up_to = self._unrecorded_up_to, None
        if epoch is None:
            return
        assert self.folder is not None
        names = {k["file"] for k in self.kept}
        for path in self.folder.glob("best-epoch*.pt"):
            found = BEST_FILE.fullmatch(path.name)
            if found and int(found.group(1)) <= epoch and path.name not in names:
                log.warning("checkpoint: removing %s, evicted by a save that was cut short", path.name)
                remove_checkpoint(path)


# The names this plugin gives its best files (best-epoch003-val_acc0.9861.pt): never a path.
BEST_FILE = re.compile(r"best-epoch(\d{3,})-[0-9A-Za-z_.+-]*\.pt")


def _is_kept_entry(entry: object) -> bool:
    """Whether a kept entry read from a checkpoint is one this plugin writes: never a path."""
    return (isinstance(entry, dict) and isinstance(entry.get("file"), str) and BEST_FILE.fullmatch(entry["file"]) is not None
            and isinstance(entry.get("score"), (int, float)) and isinstance(entry.get("epoch"), int)
            and isinstance(entry.get("step"), int))

