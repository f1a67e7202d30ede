"""TensorBoard logging: everything the seed programs logged by hand, without code.

Scalars at the core's logging interval and at each evaluation, one image grid
of a validation batch and the model graph (the seed's examples), a
precision-recall curve per class from the true labels at each evaluation,
and hparams with the final metrics; training accuracy and weight and gradient
histograms when asked.  At the defaults no hook runs during training steps.
Nothing is read back from the device per step and nothing is written inside
a training step: training accuracy is a device-side count kept per logging
interval, and the intervals' scalars wait in memory until the next write
(every ``flush_secs``, each evaluation, a checkpoint, the end of the run),
when their counts are read back in one go.  PR curves are device-side
histograms read once per evaluation.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from trainer_core import UsageError, check_saved_state, flat_settings, hookimpl, metric_keys, unused_hooks
from trainer_core_plugins.tensorboard_pictures import confusion_picture, example_images, example_indices

if TYPE_CHECKING:
    import torch
    from torch.utils.tensorboard import SummaryWriter

    from trainer_core import Trainer

log = logging.getLogger("trainer_core")

#: Thresholds of each precision-recall curve (TensorBoard's default).
PR_THRESHOLDS = 127
PENDING_LOGITS = 1 << 16  # logits per batch above which training accuracy is counted at once, not held


class TensorBoard:
    """Logs the run to TensorBoard, by default in the run folder itself, so that
    ``tensorboard --logdir runs`` names each run after its folder.

    Scalars: ``train/loss`` (mean over each logging interval), ``lr/group<i>``,
    ``train/acc`` when asked, and every evaluation metric (``val/loss``,
    ``val/acc``, ``val/acc/<class>``...; the evaluation's epoch-mean training
    loss as ``train/loss_epoch``).  Also ``images/val_batch`` (validation images
    taken in turn from each class) and the graph once, at the first evaluation
    (as the seed did), ``pr/<class>`` curves, the confusion matrix with class
    names, ``weights/*`` and ``grads/*`` histograms, hparams (what runs are
    compared by first; a run's values only for settings that apply).  At its defaults
    it does nothing during training steps: per-step work (training accuracy,
    histograms) is opt-in.  The evaluation of weights restored when training
    ends (the checkpoint plugin's best) is logged under ``restored/`` at the
    last step (``restored/val/acc``, ``restored/pr/<class>``), and hparams
    show its metrics.
    """

    def __init__(
        self,
        log_dir: Path | None = None,
        images: int = 64,
        graph: bool | None = None,
        train_accuracy: bool = False,
        pr_curves: bool = True,
        histogram_every_n_steps: int | None = 0,
        confusion_image: bool = True,
        flush_secs: int = 30,
    ) -> None:
        """:param log_dir: where the event files go (default: the run folder, so TensorBoard
            names the run after it).
        :param images: how many validation images to show (once, at the first evaluation), taken
            in turn from each class; 0 for none.
        :param graph: log the model graph (traced once on the first validation batch); the
            default, ``none``, logs it where it can be: not under ``--strategy fsdp``.
        :param train_accuracy: log ``train/acc``, the accuracy of each logging
            interval's training batches, as the seed's MNIST program did.  It
            costs a little every step (the batch's scores are held and counted
            once per interval), about 5 % of a 0.3 ms step; off by default.
        :param pr_curves: log a precision-recall curve per class at each evaluation.
        :param histogram_every_n_steps: weight and gradient histograms every N
            training steps (with gradient accumulation: at the optimizer step
            that reaches or passes each multiple of N); ``none``: at the last
            step of each epoch; 0 (the default): never.
        :param confusion_image: with class-accuracy on, show its confusion matrix as an image.
        :param flush_secs: most seconds events wait in memory before reaching the disk."""
        if images < 0:
            raise ValueError(f"tensorboard.images must be >= 0 (got {images})")
        if histogram_every_n_steps is not None and histogram_every_n_steps < 0:
            raise ValueError(f"tensorboard.histogram_every_n_steps must be >= 0 (got {histogram_every_n_steps})")
        if flush_secs < 1:
            raise ValueError(f"tensorboard.flush_secs must be >= 1 (got {flush_secs})")
        self.log_dir = log_dir
        self.images = images
        self.graph = graph
        self.train_accuracy = train_accuracy
        self.pr_curves = pr_curves
        self.histogram_every_n_steps = histogram_every_n_steps
        self.confusion_image = confusion_image
        self.flush_secs = flush_secs
        #: The open writer between ``on_fit_start`` and the end of the run.
        self.writer: SummaryWriter | None = None
        self._path: Path | None = None
        self._examples_done = False
        self._last_update: int | None = None  # the training step of the previous optimizer step
        self._histogram_step: int | None = None  # set when this batch's optimizer step gets histograms
        self._correct: torch.Tensor | None = None  # right training predictions since the last log, on the device
        self._seen = 0
        # Logged intervals not yet handed to the writer: (step, scalars, [right, seen] on the device or None).
        self._unwritten: list[tuple[int, dict[str, float], torch.Tensor | None]] = []
        self._next_write = 0.0  # time.monotonic() at which the unwritten intervals go out
        # This interval's logits and targets, counted in one go at the next log instead of a few ops per step.
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        if histogram_every_n_steps == 0:
            unused_hooks(self, "on_before_optimizer_step")  # gradients are read only for histograms
            if not train_accuracy:
                unused_hooks(self, "on_batch_end")  # nothing to do during training steps
        self._pr_counts: torch.Tensor | None = None  # 2 x classes x thresholds: positives, negatives
        self._pr_task: str | None = None  # the task PR curves are drawn for, if any
        self._keys: list[str] = []

    # -- opening and closing --------------------------------------------------

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        import torch

        task = trainer.task.name
        if self.train_accuracy and task != "classification":
            raise UsageError(f"tensorboard.train_accuracy is for the classification task, but this run's task is '{task}'; "
                             "leave it off")
        # PR curves per class or label, where the outputs are scores of classes or labels.
        self._pr_task = task if self.pr_curves and task in ("classification", "multilabel") else None
        self._keys = metric_keys([str(c) for c in trainer.data.classes])
        self._correct, self._seen = torch.zeros((), dtype=torch.int64, device=trainer.device), 0
        self._examples_done = False
        self._pending.clear()
        self._unwritten.clear()
        self._next_write = time.monotonic() + self.flush_secs
        self._last_update = self._histogram_step = None
        if not trainer.is_main:
            return  # other ranks only count (training accuracy, PR histograms) for rank zero
        # TensorBoard names a run after the folder its event files are in: the run folder's name.
        path = Path(self.log_dir) if self.log_dir is not None else trainer.run_path
        if path is None:
            raise UsageError("tensorboard has nowhere to write: this run has no run folder; set -o tensorboard.log_dir=PATH")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"tensorboard cannot create its log folder {path}: {exc.strerror}; set -o tensorboard.log_dir=PATH") from None
        if not os.access(path, os.W_OK):
            raise UsageError(f"tensorboard cannot write to {path}; set -o tensorboard.log_dir=PATH")
        import torch.utils.tensorboard  # noqa: F401  (slow import: only when the plugin is used)

        self._path = path

    def _writer(self, trainer: Trainer) -> SummaryWriter:
        """Open the writer on first use, after a resumed run has its step back.

        ``purge_step`` tells TensorBoard to hide what earlier writers in the
        folder logged after the step this run continues from: a resumed run
        continues its curves instead of doubling them, and a run started
        afresh in the folder (``--overwrite``) replaces the old curves."""
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            assert self._path is not None, "tensorboard used before on_fit_start"
            step = trainer.state.step
            # A deep queue: with torch's default of 10, each write waits for the writer thread.
            self.writer = SummaryWriter(str(self._path), purge_step=step + 1 if step > 0 else 0,
                                        flush_secs=self.flush_secs, max_queue=1000)
        return self.writer

    def _add_scalars(self, trainer: Trainer, values: Mapping[str, float], step: int) -> None:
        """Write ``values`` as one event (``add_scalar`` writes an event per value: three times the cost)."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()])
        self._writer(trainer).file_writer.add_summary(summary, step)

    def _write_intervals(self, trainer: Trainer) -> None:
        """Hand the logged intervals to the writer: their counts in one read-back, then an event each."""
        import torch

        self._next_write = time.monotonic() + self.flush_secs
        if not self._unwritten:
            return
        # Every interval holds its counts, or (training accuracy off) none does.
        counts = (torch.stack([c for _, _, c in self._unwritten]).tolist() if self.train_accuracy
                  else [(0, 0)] * len(self._unwritten))
        for (step, values, _), (right, seen) in zip(self._unwritten, counts):
            if seen:
                values["train/acc"] = right / seen
            self._add_scalars(trainer, values, step)
        self._unwritten.clear()

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    @hookimpl
    def on_fit_end(self, trainer: Trainer) -> None:
        if not trainer.is_main or self._path is None:
            return
        self._write_intervals(trainer)
        self._log_hparams(trainer, self._writer(trainer))
        self._close()

    @hookimpl
    def on_exception(self, trainer: Trainer) -> None:
        try:  # the curves up to the failure are what explains it
            if trainer.is_main and self._path is not None:
                self._write_intervals(trainer)
        finally:
            self._close()

    # -- training -------------------------------------------------------------

    @hookimpl
    def on_epoch_start(self, trainer: Trainer) -> None:
        if self._last_update is None:  # the run's first epoch, or the first after a resume
            self._last_update = trainer.state.step
        if trainer.is_main:
            self._writer(trainer)

    @hookimpl
    def on_before_optimizer_step(self, trainer: Trainer) -> None:
        # The training step under way is ``state.step + 1``: its gradients and, in
        # on_batch_end, the weights they produce are tagged with it.
        step = trainer.state.step + 1
        previous, self._last_update = self._last_update, step
        if not self._histograms_due(trainer, step, previous):
            return
        self._histogram_step = step
        self._histograms(trainer, "grads", {name: p.grad for name, p in trainer.model.named_parameters() if p.grad is not None})

    @hookimpl
    def on_batch_end(self, trainer: Trainer, targets: torch.Tensor, outputs: torch.Tensor) -> None:
        if self.train_accuracy:
            self._pending.append((outputs, targets))
            if outputs.numel() > PENDING_LOGITS:  # big logits: count now rather than hold many of them
                self._count_pending()
        if self._histogram_step is not None:
            self._histograms(trainer, "weights", dict(trainer.model.named_parameters()))
            self._histogram_step = None

    def _histograms(self, trainer: Trainer, kind: str, tensors: Mapping[str, torch.Tensor]) -> None:
        # Every rank takes part: a sharded model's whole tensors are gathered from all of them.
        for name, tensor in tensors.items():
            whole = trainer.full_tensor(tensor.detach())
            if trainer.is_main:
                self._writer(trainer).add_histogram(f"{kind}/{name}", whole, self._histogram_step)

    def _log_examples(self, trainer: Trainer, inputs: torch.Tensor) -> None:
        """The image grid and the graph, from a validation batch: the seed took its examples from
        the test loader, and during evaluation they cost the training steps nothing."""
        self._examples_done = True
        if not trainer.is_main:
            return
        writer = self._writer(trainer)
        if self.images:
            self._log_images(trainer, writer)
        if self.graph and trainer.strategy.shards_parameters:  # (asked for: said why not)
            log.warning("tensorboard: no model graph under --strategy fsdp (tracing runs the model on rank zero alone, "
                        "and a sharded model runs on every rank together)")
        elif self.graph or (self.graph is None and not trainer.strategy.shards_parameters):
            self._log_graph(trainer, writer, inputs[:1])

    def _count_pending(self) -> None:
        """Add the held logits' right predictions to the device-side count (no host sync)."""
        import torch

        assert self._correct is not None, "on_batch_end before on_fit_start"
        if self._pending:
            outputs = torch.cat([o for o, _ in self._pending])
            targets = torch.cat([t for _, t in self._pending])
            self._correct += (outputs.argmax(dim=1) == targets).sum()
            self._seen += targets.shape[0]
            self._pending.clear()

    def _histograms_due(self, trainer: Trainer, step: int, previous: int | None) -> bool:
        """Whether the optimizer step of training step ``step`` gets histograms.
        Under gradient accumulation (or after a skipped batch) a multiple of N
        can fall between two optimizer steps: the one that passes it (after the
        previous one, at step ``previous``) takes its place."""
        every = self.histogram_every_n_steps
        if every is None:  # the epoch's last step
            return trainer.state.batch_idx + 1 == len(trainer.train_batches)
        return every > 0 and step // every > (step - 1 if previous is None else previous) // every

    @hookimpl
    def on_train_log(self, trainer: Trainer, metrics: Mapping[str, float]) -> None:
        import torch

        assert self._correct is not None, "on_train_log before on_fit_start"
        counts = None
        if self.train_accuracy:
            self._count_pending()
            # The interval's right and seen, summed over the ranks, kept on the device until written.
            counts = trainer.all_reduce(torch.stack([self._correct, self._correct.new_tensor(self._seen)]))
            self._correct.zero_()
            self._seen = 0
        if not trainer.is_main:
            return
        values = {"train/loss": metrics["train/loss"]}
        if trainer.optimizer is not None:
            for index, group in enumerate(trainer.optimizer.param_groups):
                values[f"lr/group{index}"] = float(group["lr"])
        self._unwritten.append((trainer.state.step, values, counts))
        if time.monotonic() >= self._next_write:
            self._write_intervals(trainer)

    @hookimpl
    def plugin_state_dict(self, trainer: Trainer) -> dict[str, Any] | None:
        # The current interval's counts (read back only when a checkpoint is written),
        # so a run resumed mid-interval logs the same train/acc as one never stopped.
        if self._correct is None:
            return None
        self._count_pending()
        if trainer.is_main and self._path is not None:  # on disk before the checkpoint a resume starts from
            self._write_intervals(trainer)
            self._writer(trainer).flush()
        return {"correct": int(self._correct), "seen": self._seen}

    @hookimpl
    def load_plugin_state(self, trainer: Trainer, state: dict[str, Any]) -> None:
        check_saved_state(state, correct=int, seen=int)
        # The checkpoint holds rank zero's counts; on the other ranks they would be counted twice.
        if trainer.is_main and self._correct is not None:
            self._correct.fill_(state["correct"])
            self._seen = state["seen"]

    # -- evaluation -----------------------------------------------------------

    @hookimpl
    def on_eval_start(self, trainer: Trainer) -> None:
        if self._pr_task is not None:
            import torch

            self._pr_counts = torch.zeros(2 * len(self._keys) * PR_THRESHOLDS, dtype=torch.int64, device=trainer.device)

    @hookimpl
    def on_eval_batch(self, trainer: Trainer, inputs: torch.Tensor, targets: torch.Tensor, outputs: torch.Tensor) -> None:
        if not self._examples_done:
            self._log_examples(trainer, inputs)
        if self._pr_counts is None:
            return
        # Per class (or label), a histogram of the predicted probability, split by whether
        # the TRUE label is that class: TensorBoard's own binning, on the device.
        import torch

        classes = len(self._keys)
        if outputs.shape[1] != classes:
            raise UsageError(
                f"tensorboard: the model gives {outputs.shape[1]} scores per sample but the dataset "
                f"has {classes} classes, so there is no PR curve per class; build the model for this dataset"
            )
        probs = trainer.task.predict(outputs)  # softmax over classes, or each label's sigmoid
        buckets = (probs * (PR_THRESHOLDS - 1)).floor().long().clamp_(0, PR_THRESHOLDS - 1)
        if self._pr_task == "classification":
            negative = torch.ones_like(buckets).scatter_(1, targets.long().view(-1, 1), 0)
        else:
            negative = (targets == 0).long()
        columns = torch.arange(classes, device=outputs.device) * PR_THRESHOLDS
        cells = (negative * (classes * PR_THRESHOLDS) + columns + buckets).view(-1)
        self._pr_counts.scatter_add_(0, cells, cells.new_ones(cells.shape))

    @hookimpl
    def collect_eval_metrics(self, trainer: Trainer) -> None:
        # Not a producer: the one point after the last validation batch where
        # every rank is, to sum the PR histograms of all shards.
        if self._pr_counts is not None:
            trainer.all_reduce(self._pr_counts)

    @hookimpl
    def on_eval(self, trainer: Trainer, metrics: Mapping[str, Any]) -> None:
        if not trainer.is_main:
            self._pr_counts = None
            return
        writer, step, prefix = self._writer(trainer), trainer.state.step, _prefix(trainer)
        self._write_intervals(trainer)
        self._add_scalars(trainer, {
            prefix + ("train/loss_epoch" if key == "train/loss" else key): value
            for key, value in metrics.items()
            if key not in ("epoch", "step") and isinstance(value, (int, float))
        }, step)
        if self._pr_counts is not None:
            self._log_pr_curves(writer, step, prefix)
        if self.confusion_image:
            self._log_confusion(trainer, writer, step, prefix)
        writer.flush()

    def _log_pr_curves(self, writer: SummaryWriter, step: int, prefix: str) -> None:
        """The curves exactly as TensorBoard's ``compute_curve`` would from the
        probabilities and true labels, from the device-side histograms."""
        assert self._pr_counts is not None
        counts = self._pr_counts.view(2, len(self._keys), PR_THRESHOLDS).double().cpu()
        self._pr_counts = None
        # Counts at or above each threshold: a reversed cumulative sum.
        tp, fp = (c.flip(-1).cumsum(-1).flip(-1) for c in counts)
        for index, key in enumerate(self._keys):
            tp_i, fp_i = tp[index], fp[index]
            tn_i, fn_i = fp_i[0] - fp_i, tp_i[0] - tp_i
            precision = tp_i / (tp_i + fp_i).clamp(min=1e-7)
            recall = tp_i / (tp_i + fn_i).clamp(min=1e-7)
            writer.add_pr_curve_raw(
                f"{prefix}pr/{key}", tp_i.numpy(), fp_i.numpy(), tn_i.numpy(), fn_i.numpy(),
                precision.numpy(), recall.numpy(), global_step=step, num_thresholds=PR_THRESHOLDS,
            )

    def _log_confusion(self, trainer: Trainer, writer: SummaryWriter, step: int, prefix: str) -> None:
        """class-accuracy's matrix (collected before ``on_eval``) as a picture with the
        class names and axis titles: a cell's blue is the share of its true class
        predicted as its column's class, and its count is written in it."""
        for plugin in trainer.pm.get_plugins():
            confusion = getattr(plugin, "confusion", None)  # class-accuracy's, or any plugin's that keeps one
            if confusion is not None and confusion.dim() == 2 and confusion.shape[0] == confusion.shape[1]:
                name = trainer.pm.get_name(plugin)
                classes = [str(c) for c in trainer.data.classes]
                names = classes if len(classes) == confusion.shape[0] else [str(i) for i in range(confusion.shape[0])]
                writer.add_image(f"{prefix}{name}/confusion", confusion_picture(confusion, names), step)

    # -- one-off records ------------------------------------------------------

    def _log_images(self, trainer: Trainer, writer: SummaryWriter) -> None:
        """A fixed set of ``images`` validation images, taken in turn from each class
        (not the first batch: a split read in class order shows one class there)."""
        import torch
        from torchvision.utils import make_grid

        data = trainer.data
        if len(data.input_shape) != 3:
            return  # feature vectors, token ids: not images
        if data.input_shape[0] not in (1, 3):
            log.warning("tensorboard: inputs of shape %s are not 1- or 3-channel images; no image grid logged",
                        tuple(data.input_shape))
            return
        images = example_images(data.val, example_indices(data.val, len(data.classes), self.images))
        if images.dtype == torch.uint8:  # stored pixels, before the core scales and normalises them
            grid = make_grid(images.float() / 255, nrow=8)
        else:  # no pixel range to go by: stretch theirs to [0, 1]
            grid = make_grid(images.float(), nrow=8, normalize=True)
        writer.add_image("images/val_batch", grid, trainer.state.step)

    def _log_graph(self, trainer: Trainer, writer: SummaryWriter, example: torch.Tensor) -> None:
        import torch

        # add_graph traces in eval mode (no batch-norm statistics or dropout
        # randomness consumed); its own failure report goes to stdout, so catch it.
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's deprecation notice
                writer.add_graph(trainer.model, example)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            log.warning("tensorboard: the model cannot be traced, so no graph is logged (%s: %s)", type(exc).__name__, first)

    def _log_hparams(self, trainer: Trainer, writer: SummaryWriter) -> None:
        """The run's settings against its final metrics (the HParams tab).  The
        metric values are the scalars of this run, so nothing is written twice."""
        from torch.utils.tensorboard.summary import hparams

        final = {k: v for k, v in trainer.state.metrics.items() if k not in ("epoch", "step") and isinstance(v, (int, float))}
        if not final:
            return
        # TensorBoard shows the first few metric columns: the headline, the losses, then the rest (per class).
        first = [trainer.task.headline, "val/loss", "train/loss"]
        ordered = sorted(final, key=lambda k: first.index(k) if k in first else len(first))
        metric_tags = {_prefix(trainer) + ("train/loss_epoch" if k == "train/loss" else k): final[k] for k in ordered}
        every, applying = _hparam_values(trainer)
        # The columns are every setting (TensorBoard takes them from one run's record, whichever it reads
        # first: an Adam run's must list SGD's momentum too); this run's values are the settings that apply.
        experiment, _, _ = hparams(every, metric_tags)
        _, start, end = hparams(applying, metric_tags)
        for summary in (_compared_first(experiment), start, end):
            writer.file_writer.add_summary(summary)  # type: ignore[union-attr]


def _prefix(trainer: Trainer) -> str:
    """Tags of the evaluation of weights restored after training (the best) start with
    ``restored/``: logged at the last step, they are no point of the epochs' curves."""
    return "restored/" if trainer.state.restored is not None else ""


#: Settings runs are compared by: the HParams table shows them first (the five it shows at first).
COMPARED = ("lr", "optimizer", "momentum", "weight_decay", "batch_size")


def _hparam_values(trainer: Trainer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config as flat ``name: number | string | bool`` pairs: all of them, and
    those that apply to this run (no ``momentum`` but for SGD, no ``compile_mode``
    without ``--compile``)."""
    config = trainer.config
    flat: dict[str, Any] = {}
    for key, value in config.to_toml().items():
        if isinstance(value, Mapping):
            for inner, item in flat_settings(value):
                flat[f"{key}.{inner}"] = item
        else:
            flat[key] = value
    every = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat.items()}
    moot = {"momentum"} if config.optimizer != "sgd" else set()
    if not config.compile:
        moot.add("compile_mode")
    return every, {k: v for k, v in every.items() if k not in moot}


def _compared_first(experiment: Any) -> Any:
    """``experiment`` (hparams' summary) with the compared settings marked as the ones that
    differ between runs: TensorBoard lists those first (by name) and shows the first five."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    value = experiment.value[0]
    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in COMPARED
    value.metadata.plugin_data.content = data.SerializeToString()
    return experiment
