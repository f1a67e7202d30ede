"""The training loop: train and evaluate, emit hook events, nothing optional.

The loop knows three named parts and nothing of their insides: the task
(loss, metrics: :mod:`trainer_core.task`), the strategy (one process or
several: :mod:`trainer_core.strategy`) and the plugins, which react to the
events it emits (:mod:`trainer_core.hookspecs` has the contract and the order).
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping

import pluggy
import torch
from torch import nn

from trainer_core import distributed
from trainer_core.config import RunConfig
from trainer_core.data import Batches, DataBundle
from trainer_core.errors import TrainerError, UsageError
from trainer_core.graphstep import GraphStep, graph_step_for
from trainer_core.lossmeter import LossMeter
from trainer_core.pluginmanager import (blame_plugin, call_each_guarded, direct_caller, hook_names, make_plugin_manager,
                                        merge_collected, register)
from trainer_core.rundir import RunDir
from trainer_core.runtime import select_device
from trainer_core.signals import StopOnSignal
from trainer_core.snapshot import Checkpoints
from trainer_core.state import TrainState
from trainer_core.stepping import OPTIMIZERS, Stepper, autocast_for
from trainer_core.strategy import make_strategy
from trainer_core.summary import run_summary
from trainer_core.task import Task, check_fit, load_task, task_name


class Trainer(Checkpoints):
    """Runs one training job and tells its plugins about every step of it.

    :param model: the network to train.
    :param data: the dataset's splits, output names and input shape.
    :param config: the run's settings (defaults when omitted).
    :param task: the task (a :class:`~trainer_core.Task`); when omitted, the one
        ``config.task`` or the dataset names, with ``config.task_options``.
    :param plugins: plugins to register by name, in addition to those already in ``pm``.
    :param pm: a plugin manager from :func:`~trainer_core.make_plugin_manager`
        (a fresh one when omitted).
    :param run_dir: the open run folder for ``metrics.jsonl`` and
        ``summary.json``, or ``None`` to write nothing.
    :param resume: a checkpoint (as loaded by ``load_checkpoint``) to continue from.
    """

    def __init__(self, model: nn.Module, data: DataBundle, config: RunConfig | None = None, *, task: Task | None = None,
                 plugins: Mapping[str, object] | None = None, pm: pluggy.PluginManager | None = None,
                 run_dir: RunDir | None = None, resume: Mapping[str, Any] | None = None) -> None:
        c = self.config = (config or RunConfig()).validate()
        self.pm = pm or make_plugin_manager()
        for name, plugin in (plugins or {}).items():
            register(self.pm, name, plugin)
        # Under torchrun: join the process group (if the caller has not) and take this rank's device.
        self.device = distributed.init_for_library(select_device(c.device))
        self.task = task or load_task(task_name(c.task, data), c.task_options)
        check_fit(self.task, data, c.dataset)  # (an empty split too)
        self.task.setup(data, self.device)
        self.model = model.to(self.device, memory_format=torch.channels_last) if c.channels_last else model.to(self.device)
        self.data, self.run_dir, self.resume = data, run_dir, resume
        self.optimizer: torch.optim.Optimizer | None = None
        self.stepper: Stepper | None = None
        self.graph_step: GraphStep | None = None  # the steps replayed from CUDA graphs (cuda_graph), or None: eager
        self.state, self.losses = TrainState(), LossMeter()
        self.strategy = make_strategy(c, self.device, self._compiled if c.compile else None)
        self.rank, self.world_size, self.distributed = self.strategy.rank, self.strategy.world_size, self.strategy.distributed
        self.strategy.join(c, self.pm, self.model)
        # What runs the forward pass: the model itself, or its compiled form (same parameters).
        self.forward_model: nn.Module = self._compiled(self.model) if c.compile else self.model
        self.train_forward = self.forward_model  # what training calls (the strategy's wrapper, if any)
        self.autocast = autocast_for(c.precision, self.device)
        batching = dict(mean=data.mean, std=data.std, channels_last=c.channels_last, num_workers=c.num_workers,
                        rank=self.rank, world_size=self.world_size, input_dims=len(data.input_shape))
        self.train_batches = Batches(data.train, c.batch_size, self.device, shuffle=True, seed=c.seed, **batching)
        self.val_batches = Batches(data.val, c.batch_size, self.device, shuffle=False,
                                   equal_steps=self.strategy.shards_parameters, **batching)
        self._compiling = c.compile
        self.signals = StopOnSignal(self.request_stop)
        #: ``True`` silences :meth:`echo` (``trainer run -q``).
        self.quiet = False
        self.checkpoint_files: dict[str, str] = {}  # (name_checkpoint)

    # -- the loop ------------------------------------------------------------

    def fit(self) -> TrainState:
        """Train for ``config.epochs`` epochs (or until a plugin stops the run)."""
        status, error, refused = "completed", None, False
        self._kept_work = False  # (set when an epoch has ended: see refused below)
        self.state.started_at = self.state.started_at or time.time()  # (a resume then restores the first start)
        self.state.start_session()  # (a resume then restores the earlier sessions' time)
        try:
            with self.signals:
                self._fit()
            status = self.stop_status if self.state.should_stop else status
            return self.state
        except BaseException as exc:
            status, error = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed", f"{type(exc).__name__}: {exc}"
            # Bad input, found before the run kept anything (an epoch's end, a checkpoint): at the start, or at
            # the first evaluation (a monitored metric that no plugin's metrics hold).
            refused = isinstance(exc, UsageError) and not self._kept_work and not self.checkpoint_files
            call_each_guarded(self.pm, "on_exception", trainer=self, exception=exc)
            fault = blame_plugin(self.pm, exc)
            if fault is not None:
                raise fault from exc
            raise
        finally:
            session = self.state.end_session()
            summary = None
            try:
                if self.run_dir is not None:
                    summary = run_summary(self.state, self.config, self.task, status=status, error=error,
                                          session_duration=session, device=self.device, processes=self.world_size,
                                          skipped_steps=self.stepper.skipped if self.stepper else 0,
                                          checkpoints=self.checkpoint_files) if self.is_main else None
                    self.run_dir.finish(summary, failed=error is not None, discard=refused)
            finally:
                self.close_loaders()
                # Last, on every path (a summary.json that could not be written too): trackers report the
                # outcome and copy summary.json (guarded: never raises).
                call_each_guarded(self.pm, "on_run_end", trainer=self, status=status, summary=summary)

    def close_loaders(self) -> None:
        """End the loader processes of both splits (a later ``fit`` or ``evaluate`` starts
        new ones); ``fit`` does it when it ends, whatever the end."""
        self.train_batches.close()
        self.val_batches.close()

    def _fit(self) -> None:
        self._emit("on_setup", trainer=self)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise UsageError("the model has no trainable parameters (every parameter is frozen)")
        self.train_forward = self.strategy.prepare(self.model, self.forward_model)
        self.optimizer = OPTIMIZERS[self.config.optimizer](params, self.config)
        self._hot = {name: direct_caller(self.pm, name) for name in hook_names()}
        syncing = self.strategy.gradient_sync(self.config.accumulate_grad_batches)  # (see _train_epoch)
        self.stepper = Stepper(self.config, self.device, self.optimizer, self._hot["on_before_optimizer_step"],
                               (lambda: self.strategy.average_gradients(self.model)) if syncing else None)
        self.graph_step = self.graph_step or graph_step_for(self)
        self._emit("on_fit_start", trainer=self)
        if self.resume is not None:
            self.load_checkpoint_state(self.resume)
            self.resume = None  # restored: no second copy of the weights and optimizer state for the whole run
            if self.losses.pending and self.state.batch_idx % self.config.log_every_n_steps == 0:
                self._log_interval()  # saved in on_batch_end of a logging step, before its log: emit it, as the first run did
            if self.run_dir is not None and self.is_main:
                self.run_dir.continue_from(self.state.step)
        elif self.run_dir is not None and self.is_main:
            self.run_dir.begin()  # past the plugins' checks: a run this one replaces goes now
        while not self.state.should_stop and self._next_epoch():
            if self.state.batch_idx < len(self.train_batches):  # else: resumed between its training and evaluation
                self._train_epoch()
            if self.state.should_stop and self.state.batch_idx < len(self.train_batches):
                break  # stopped mid-epoch: no evaluation of a partial epoch
            if not self.evaluate():
                break  # a signal cut the evaluation short
            self._emit("on_epoch_end", trainer=self, epoch=self.state.epoch)
            self._kept_work = True
            if self.distributed:  # also waits for rank zero's end-of-epoch files (checkpoints)
                self.strategy.agree(self.state)
        self._emit("on_fit_end", trainer=self)
        # The strategy's wrapper (DDP's, with its pending gradient buckets) released while the process group lives:
        # left to the garbage collector at interpreter exit, gloo aborts the process (a second fit wraps anew).
        self.strategy.teardown()
        self.train_forward = self.forward_model

    def _next_epoch(self) -> bool:
        """Move to the next epoch unless one is part-way (a mid-epoch resume, or a resume
        of an epoch whose evaluation a signal cut short); False when done."""
        state = self.state
        if state.epoch > 0 and (state.batch_idx < len(self.train_batches) or state.metrics.get("epoch") != state.epoch):
            return True
        if state.epoch >= self.config.epochs:
            return False
        state.epoch, state.batch_idx = state.epoch + 1, 0
        return True

    def _train_epoch(self) -> None:
        hot, state, stepper, task, losses = self._hot, self.state, self.stepper, self.task, self.losses
        assert stepper is not None
        batch_start, before_backward, batch_end = hot["on_batch_start"], hot["on_before_backward"], hot["on_batch_end"]
        log_every, last = self.config.log_every_n_steps, len(self.train_batches) - 1
        uneven, scale, uneven_size = self.train_batches.uneven or (-1, 1.0, 0)
        first = state.batch_idx
        if first == 0:
            losses.start_epoch()
        self.model.train()
        self._emit("on_epoch_start", trainer=self, epoch=state.epoch)
        model = self.train_forward = self.strategy.prepare(self.model, self.forward_model)  # (a plugin may have unfrozen)
        syncing = self.strategy.gradient_sync(stepper.accumulate)
        # CUDA graphs replay into the same output buffers, and a plugin may keep a batch's outputs
        # past its step (tensorboard's training accuracy): hand it a copy then.
        graphed = self.config.compile and self.config.compile_mode == "reduce-overhead"
        kept = (lambda outputs: outputs.detach().clone()) if graphed else torch.Tensor.detach
        started, graph = time.perf_counter(), self.graph_step
        batches = graph.batches(state.epoch, first) if graph else self.train_batches.iterate(state.epoch, first, self._stopped_by_signal)
        for batch_idx, (inputs, targets) in enumerate(batches, first):
            if batch_start:
                batch_start(trainer=self, batch_idx=batch_idx, inputs=inputs, targets=targets)
            if syncing:
                syncing(stepper.will_step(batch_idx == last))
            if graph:  # the whole step replayed (graphstep.py); what plugins may keep comes back copied
                inputs, targets, outputs, loss, counted = graph.step(inputs, targets)
            else:
                with self.autocast():
                    outputs = model(inputs)
                    loss = task.loss(outputs, targets)
                if before_backward:
                    before_backward(trainer=self, loss=loss)
                counted = stepper.backward_and_step(loss if batch_idx != uneven else loss * scale, batch_idx == last, self)
            state.step += 1
            state.batch_idx = batch_idx + 1
            loss = loss.detach()
            if counted:
                losses.add(loss, targets.shape[0] if batch_idx != uneven else uneven_size)
            if self._compiling:  # the first step of a compiled model is mostly compilation
                self._compiling = False
                state.compile_seconds, started = time.perf_counter() - started, time.perf_counter()
            if batch_end:
                batch_end(trainer=self, batch_idx=batch_idx, inputs=inputs, targets=targets, outputs=kept(outputs),
                          loss=loss, optimizer_stepped=stepper.stepped)
            if state.batch_idx % log_every == 0:
                self._log_interval()
            if state.should_stop:
                break
        if syncing:
            syncing(True)
        # The epoch's last, partial interval.  A run stopped mid-epoch keeps it pending (its
        # checkpoint carries it), so a resumed run logs the same intervals as one never stopped.
        if losses.pending and state.batch_idx == len(self.train_batches):
            self._log_interval()  # (pending steps, not samples: the same on every rank, whose part may be empty)
        state.train_seconds += time.perf_counter() - started

    def _log_interval(self) -> None:
        """Read the interval's losses back (the one host sync) and emit ``on_train_log``."""
        total, samples = self.losses.take_interval(self.strategy, self.state)
        if not samples:  # every batch of the interval was skipped for a non-finite loss: no loss to report
            return
        if not math.isfinite(total):
            raise TrainerError(f"training loss became {total} in epoch {self.state.epoch} by step {self.state.step}; "
                               "lower the learning rate or check the data")
        self.state.train_samples += samples
        self._emit("on_train_log", trainer=self, metrics={"train/loss": total / samples, "train/samples": float(samples),
                                                          "lr": self.lr})

    def _stopped_by_signal(self) -> bool:
        """Whether a signal asks this process to stop now (ranks of a distributed run stop together, at an epoch's end)."""
        return self.signals.received is not None and not self.distributed

    def evaluate(self) -> dict[str, float]:
        """Run the validation split, merge the task's and every plugin's metrics, record and emit them.

        Returns an empty mapping, recording nothing, when a signal arrives mid-evaluation.
        """
        return self._evaluate({"epoch": self.state.epoch, "step": self.state.step, "train/loss": self.losses.epoch_mean()})

    def evaluate_restored(self, epoch: int, step: int, source: str) -> dict[str, float]:
        """Evaluate the weights a plugin restored when training ended (saved at ``epoch``
        and ``step``, read from ``source``) and make that the run's final evaluation:
        ``state.metrics`` (summary.json's ``final``) and what ``on_eval`` reports, with
        ``state.restored`` set so consumers tell it from an epoch's; the last epoch's
        stays as ``state.last_epoch_metrics``.  No epoch was trained, so nothing joins
        ``history`` or ``metrics.jsonl``.  Every rank calls it."""
        state = self.state
        trained = next((m for m in state.history if m.get("step") == step), {})  # (its epoch's training loss)
        if state.restored is None:
            state.last_epoch_metrics = state.metrics
        state.restored = {"epoch": epoch, "step": step, "source": source}
        head = {"epoch": epoch, "step": step, "train/loss": trained.get("train/loss", math.nan)}
        metrics = self._evaluate(head, record=False)
        if not metrics:  # a signal cut it short: the last epoch's evaluation stays the final one
            state.restored = state.last_epoch_metrics = None
        return metrics

    def _evaluate(self, head: dict[str, float], record: bool = True) -> dict[str, float]:
        model = self.forward_model  # never the strategy's wrapper: evaluation needs no gradient reduction
        # Called mid-epoch by a plugin, training must go on in the modes it had (frozen batch norm included).
        modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()
        self.strategy.share_buffers(self.model)  # batch-norm statistics drift apart per rank: evaluate rank zero's
        self._emit("on_eval_start", trainer=self)
        eval_batch = direct_caller(self.pm, "on_eval_batch")
        sums = self.task.new_sums(self.device)
        with torch.no_grad():
            for inputs, targets in self.val_batches.iterate(stopping=self._stopped_by_signal):
                if self._stopped_by_signal():
                    return {}
                with self.autocast():
                    outputs = model(inputs)
                self.task.add_sums(sums, outputs.float(), targets)
                if eval_batch:
                    eval_batch(trainer=self, inputs=inputs, targets=targets, outputs=outputs)
        if self._stopped_by_signal():  # the loader's workers got the signal too and ended the pass early
            return {}
        metrics: dict[str, float] = dict(head)
        producers = dict.fromkeys(metrics, "the core")
        metrics.update(self.task.metrics(self.strategy.all_reduce(sums)))
        producers.update(dict.fromkeys(metrics.keys() - producers.keys(), f"the task '{self.task.name}'"))
        merge_collected(self.pm, metrics, producers, trainer=self)
        metrics = self.strategy.share_object(metrics)  # rank zero's, also for metrics of its rank-zero-only plugins
        self.state.metrics = metrics
        if record:
            self.state.history.append(metrics)
        if record and self.run_dir is not None and self.is_main:
            self.run_dir.append_metrics(metrics)
        self._emit("on_eval", trainer=self, metrics=metrics)
        for module, training in modes:
            module.training = training
        return metrics

    # -- plumbing ------------------------------------------------------------

    def _compiled(self, module: nn.Module) -> nn.Module:
        return torch.compile(module, mode=self.config.compile_mode)  # type: ignore[return-value]

    def _emit(self, name: str, **kwargs: Any) -> None:
        getattr(self.pm.hook, name)(**kwargs)
