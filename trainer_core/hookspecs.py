"""The contract between the training loop and its plugins.

Every hook is called with keyword arguments; an implementation takes only the
arguments it needs, so adding an argument later breaks nobody.  pluggy calls
implementations in an order that depends on registration, so no hook here lets
one plugin see another's effect within the same call: producers *return* data
that the core merges (``collect_eval_metrics``, ``plugin_state_dict``) and
consumers read the merged result in a later hook (``on_eval``).

The order of one run with evaluation every epoch::

    on_setup
    on_fit_start
    load_plugin_state                       (only when resuming)
    for each epoch:
        on_epoch_start
        for each training batch:
            on_batch_start
            on_before_backward
            on_before_optimizer_step        (a batch that steps the optimizer)
            on_batch_end
            on_train_log                    (every ``log_every_n_steps`` steps)
        on_train_log                        (the epoch's last, partial interval)
        on_eval_start
        on_eval_batch                       (each validation batch)
        collect_eval_metrics
        on_eval
        on_epoch_end
    on_fit_end
    on_run_end                              (last, however the run ended)

``plugin_state_dict`` runs whenever a checkpoint is written; ``on_exception``
runs instead of the rest when an exception escapes the loop (``on_run_end``
still comes last).

Two rules of order exist, both for plugins that save or swap weights.  A plugin
that *saves* the run's state (a checkpoint writer) marks its ``on_batch_end`` /
``on_epoch_end`` implementation ``@hookimpl(trylast=True)``, so it runs after
every other plugin has updated its state for that step or epoch (a scheduler's
step, an early-stopping counter) and the checkpoint resumes exactly.  At the end,
it saves in an ``on_fit_end`` wrapper (``@hookimpl(wrapper=True)``, before every
other ``on_fit_end``), and a plugin that *restores* other weights does it in
``@hookimpl(tryfirst=True)``, so the trained state is saved first and reporters
see the restored model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import pluggy

if TYPE_CHECKING:
    import torch

    # What a hook's ``trainer`` offers plugins (the Trainer is one): the contract needs no loop.
    from trainer_core.plugin_api import PluginAPI as Trainer

PROJECT = "trainer"

hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec
def on_setup(trainer: Trainer) -> None:
    """Called once, after the model is built and moved to its device and
    before the optimizer is created.

    Change the model here: freeze parameters (the optimizer is then built from
    the parameters that still require gradients), swap layers, register
    forward hooks.  ``trainer.optimizer`` is ``None`` during this hook.

    :param trainer: the running :class:`~trainer_core.Trainer`.
    :return: ignored.
    """


@hookspec
def on_fit_start(trainer: Trainer) -> None:
    """Called once when everything is built (model, optimizer, data), just
    before training starts and before any resumed state is loaded.

    Create objects that wrap the optimizer here (learning-rate schedulers),
    open log writers, validate options against the dataset (for example a
    metric name) and raise :class:`~trainer_core.UsageError` if they do not fit.

    :param trainer: the running :class:`~trainer_core.Trainer`.
    :return: ignored.
    """


@hookspec
def on_epoch_start(trainer: Trainer, epoch: int) -> None:
    """Called at the start of each training epoch, after ``model.train()``.

    A run resumed from a mid-epoch checkpoint calls it again for the epoch it
    stopped in, with the same ``epoch``: that epoch's first ``on_batch_start``
    then has a ``batch_idx`` above 0 (the batches done before are not run
    again).  A plugin that resets per-epoch state here and needs the whole
    epoch's worth saves that state in ``plugin_state_dict``.

    :param trainer: the running :class:`~trainer_core.Trainer`.
    :param epoch: the epoch about to run (or to finish, on a mid-epoch
        resume), counted from 1.
    :return: ignored.
    """


@hookspec
def on_batch_start(trainer: Trainer, batch_idx: int, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    """Called for each training batch, after it is on the device and before
    the forward pass.

    :param trainer: the running :class:`~trainer_core.Trainer`.
    :param batch_idx: index of the batch within the epoch, from 0 (the first
        one after a mid-epoch resume is above 0).
    :param inputs: the batch's inputs, on the training device, normalised.
    :param targets: the batch's targets, on the training device, in the task's
        form (``trainer.task.name``): class indices for classification, float
        values for regression, multi-hot rows for multilabel, the next token ids
        for a language model.
    :return: ignored.
    """


@hookspec
def on_before_backward(trainer: Trainer, loss: torch.Tensor) -> None:
    """Called after the forward pass and the loss, before ``loss.backward()``.

    :param trainer: the running :class:`~trainer_core.Trainer`.
    :param loss: the batch's mean loss, a 0-dim tensor on the device that still
        carries its graph.  Reading its value (``loss.item()``) forces a host
        sync: do it at intervals, not every step.
    :return: ignored.
    """


@hookspec
def on_before_optimizer_step(trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
    """Called after ``loss.backward()`` and before ``optimizer.step()``: the
    gradients are complete (and unscaled under fp16).  Clip, inspect or log
    gradients here.  Called only for batches that end in an optimizer step: with
    gradient accumulation, once per ``accumulate_grad_batches`` batches.

    :param trainer: the running :class:`~trainer_core.Trainer`.
    :param optimizer: the optimizer about to step (also ``trainer.optimizer``).
    :return: ignored.
    """


@hookspec
def on_batch_end(
    trainer: Trainer,
    batch_idx: int,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    outputs: torch.Tensor,
    loss: torch.Tensor,
    optimizer_stepped: bool,
) -> None:
    """Called after each training batch (and its optimizer step, if it had one).
    ``trainer.state.step`` already counts this batch.

    :param trainer: the running :class:`~trainer_core.Trainer`.
    :param batch_idx: index of the batch within the epoch, from 0.
    :param inputs: the batch's inputs, on the device.
    :param targets: the batch's targets, in the task's form (see :func:`on_batch_start`).
    :param outputs: the model's outputs for the batch (class logits for
        classification, one value per target for regression, a logit per label
        for multilabel, ``N x T x vocabulary`` logits for a language model),
        detached; a plugin may
        keep them past the step (with ``compile_mode = "reduce-overhead"``, whose
        CUDA graphs reuse their buffers, they are a copy).
    :param loss: the batch's mean loss, detached, on the device.
    :param optimizer_stepped: whether the optimizer stepped after this batch
        (not while gradients accumulate, nor for a batch skipped for a
        non-finite loss).  Act "after each optimizer step" on this.
    :return: ignored.
    """


@hookspec
def on_train_log(trainer: Trainer, metrics: Mapping[str, float]) -> None:
    """Called every ``log_every_n_steps`` training steps and once more at the
    end of each epoch for the last, partial interval.  This is the core's only
    host sync during training: use it to log or print training progress.

    :param trainer: the running :class:`~trainer_core.Trainer`.
    :param metrics: ``train/loss`` (mean loss over the interval, weighted by
        batch size), ``train/samples`` (samples in the interval) and ``lr``
        (learning rate of the first parameter group), as Python floats.
    :return: ignored.
    """


@hookspec
def on_eval_start(trainer: Trainer) -> None:
    """Called before each evaluation pass, after ``model.eval()``.
    Reset per-evaluation accumulators here.

    :param trainer: the running :class:`~trainer_core.Trainer`.
    :return: ignored.
    """


@hookspec
def on_eval_batch(trainer: Trainer, inputs: torch.Tensor, targets: torch.Tensor, outputs: torch.Tensor) -> None:
    """Called for each validation batch, under ``torch.no_grad()``.
    Metric collectors accumulate on the device here (no ``.item()``).  In a
    run of several processes each sees only its own part of the split: reduce
    in :func:`collect_eval_metrics`.

    :param trainer: the running :class:`~trainer_core.Trainer`.
    :param inputs: the batch's inputs, on the device.
    :param targets: the batch's targets, in the task's form (see :func:`on_batch_start`).
    :param outputs: the model's outputs for the batch, as in :func:`on_batch_end`
        (``trainer.task.predict(outputs)`` reads them as probabilities or values).
    :return: ignored.
    """


@hookspec
def collect_eval_metrics(trainer: Trainer) -> Mapping[str, float] | None:
    """Called after the last validation batch: return the metrics this plugin
    computed for the evaluation.

    The core merges every plugin's mapping with the task's metrics
    (``val/loss`` and ``val/acc`` for classification); two producers of the
    same name stop the run with an error naming both.  Use names like ``val/acc/<class>``.  In a run of several
    processes, sum what ``on_eval_batch`` collected with
    ``trainer.all_reduce(tensor)`` here (on every rank), then divide.

    :param trainer: the running :class:`~trainer_core.Trainer`.
    :return: a mapping of metric name to a Python number, or ``None``.
    """


@hookspec
def on_eval(trainer: Trainer, metrics: Mapping[str, float]) -> None:
    """Called after each evaluation with the merged metrics of the epoch.
    Consumers (checkpointing, loggers, schedulers on a monitored metric,
    early stopping) act here.  The same mapping is in ``trainer.state.metrics``
    and is written to ``metrics.jsonl``.  Weights a plugin restores when training
    ends (the checkpoint plugin's best, early-stopping's with ``restore_best_weights``)
    are evaluated once more, within ``on_fit_end``: ``trainer.state.restored`` then
    says which, and nothing is written to ``metrics.jsonl`` (see ``Trainer.evaluate_restored``).

    :param trainer: the running :class:`~trainer_core.Trainer`.
    :param metrics: ``epoch``, ``step``, ``train/loss``, the task's metrics
        (``val/loss`` first; ``val/acc`` for classification, ``val/r2`` and more
        for regression: ``trainer tasks`` lists them) and every collected metric.
    :return: ignored.
    """


@hookspec
def on_epoch_end(trainer: Trainer, epoch: int) -> None:
    """Called at the end of each epoch, after its evaluation.  Per-epoch
    schedulers step here.  Call ``trainer.request_stop(reason)`` to end the
    run after this epoch.

    :param trainer: the running :class:`~trainer_core.Trainer`.
    :param epoch: the epoch that just ended, counted from 1.
    :return: ignored.
    """


@hookspec
def on_fit_end(trainer: Trainer) -> None:
    """Called once when training ends normally or is stopped by a plugin, by
    Ctrl-C or by SIGTERM (``trainer.state.stop_reason`` says why).  Restore best weights, print
    reports and close writers here.  Not called when an exception escapes;
    see :func:`on_exception`.  A plugin that restores weights does it first
    (``@hookimpl(tryfirst=True)``) and calls ``Trainer.evaluate_restored``, so
    reporters see the model the run leaves; the checkpoint plugin's ``on_fit_end``
    is a wrapper (``@hookimpl(wrapper=True)``): it saves the trained state and
    restores its best weights before any other plugin's runs.

    :param trainer: the running :class:`~trainer_core.Trainer`.
    :return: ignored.
    """


@hookspec
def on_exception(trainer: Trainer, exception: BaseException) -> None:
    """Called when an exception escapes the training loop, before it
    propagates.  Close files and release resources; do not raise.  An
    exception raised here is reported and does not hide the original one.

    A first Ctrl-C (SIGINT) or SIGTERM is not an exception: the run stops after
    the current step as :meth:`~trainer_core.Trainer.request_stop` stops it,
    a checkpoint writer saves (``plugin_state_dict``), ``on_fit_end`` runs
    and the program exits 130 or 143.  A second Ctrl-C raises
    ``KeyboardInterrupt`` at once, which does come here.

    :param trainer: the running :class:`~trainer_core.Trainer`.
    :param exception: the exception that ended the run.
    :return: ignored.
    """


@hookspec
def on_run_end(trainer: Trainer, status: str, summary: Mapping[str, Any] | None) -> None:
    """Called once, last of all, however the run ended: after :func:`on_fit_end`
    or :func:`on_exception`, and after the run folder's ``summary.json`` is
    written, so a plugin can copy it elsewhere.  Report the outcome to the
    outside world here (an experiment tracker's run status).  An exception
    raised here is reported as a warning and changes nothing about the run.

    :param trainer: the :class:`~trainer_core.Trainer` that ran.
    :param status: how the run ended, as ``summary.json`` says: ``completed``,
        ``stopped`` (a plugin or a signal asked; ``trainer.state.stop_reason``
        says which: ``received SIGTERM`` for a signal), ``interrupted`` (a
        second Ctrl-C) or ``failed``.
    :param summary: what ``summary.json`` holds, on the main process of a run
        that writes a folder; ``None`` elsewhere.
    :return: ignored.
    """


@hookspec
def plugin_state_dict(trainer: Trainer) -> dict[str, Any] | None:
    """Called when a checkpoint is written: return this plugin's state.

    The core stores each plugin's return value under the plugin's registered
    name, so two instances of one class never collide.  Return plain Python
    data and tensors only (checkpoints are loaded with ``weights_only=True``).

    :param trainer: the running :class:`~trainer_core.Trainer`.
    :return: the plugin's state, or ``None`` for nothing to save.
    """


@hookspec
def load_plugin_state(trainer: Trainer, state: dict[str, Any]) -> None:
    """Called when a run resumes from a checkpoint, after ``on_fit_start`` and
    before the optimizer's state is loaded (so a plugin that added parameter
    groups, like freeze's unfreezing, rebuilds them first), with the state this
    plugin (by registered name) returned from :func:`plugin_state_dict`.  Not
    called for a plugin that saved nothing.

    :param trainer: the running :class:`~trainer_core.Trainer`.
    :param state: what this plugin saved.
    :return: ignored.
    """
