"""The training loop: train and evaluate, emit hook events, nothing optional.

Everything a user turns on is a plugin reacting to the events this loop emits
(see :mod:`trainer_core.hookspecs` for the contract and the order).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import pluggy
import torch
from torch import nn

from trainer_core import __version__, distributed
from trainer_core.checkpointing import FORMAT, save_checkpoint
from trainer_core.config import RunConfig
from trainer_core.data import Batches, DataBundle
from trainer_core.errors import PluginError, TrainerError, UsageError
from trainer_core.pluginmanager import call_each, direct_caller, hook_names, locate_fault, make_plugin_manager, register
from trainer_core.rundir import RunDir
from trainer_core.runtime import rng_state, seed_everything, select_device, set_rng_state
from trainer_core.signals import StopOnSignal
from trainer_core.state import TrainState
from trainer_core.summary import run_summary
from trainer_core.stepping import Stepper, autocast_for

log = logging.getLogger("trainer_core")

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, c: torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
    "adam": lambda params, c: torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay),
    "adamw": lambda params, c: torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay),
}


class Trainer:
    """Runs one training job and tells its plugins about every step of it.

    :param model: the network to train.
    :param data: the dataset's splits, class names and input shape.
    :param config: the run's settings (defaults when omitted).
    :param plugins: plugins to register by name, in addition to those already in ``pm``.
    :param pm: a plugin manager from :func:`~trainer_core.make_plugin_manager`
        (a fresh one when omitted).
    :param run_dir: the open run folder for ``metrics.jsonl`` and
        ``summary.json``, or ``None`` to write nothing.
    :param resume: a checkpoint (as loaded by ``load_checkpoint``) to continue from.
    """

    def __init__(
        self,
        model: nn.Module,
        data: DataBundle,
        config: RunConfig | None = None,
        *,
        plugins: Mapping[str, object] | None = None,
        pm: pluggy.PluginManager | None = None,
        run_dir: RunDir | None = None,
        resume: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = (config or RunConfig()).validate()
        self.pm = pm or make_plugin_manager()
        for name, plugin in (plugins or {}).items():
            register(self.pm, name, plugin)
        # Under torchrun: join the process group (if the caller has not) and take this rank's device.
        self.device = distributed.init_for_library(select_device(self.config.device))
        self.model = model.to(self.device)
        self.data = data
        self.loss_fn: nn.Module = nn.CrossEntropyLoss()
        self.optimizer: torch.optim.Optimizer | None = None
        self.state = TrainState()
        self.run_dir = run_dir
        self.resume = resume
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.distributed = distributed.is_initialized()
        c = self.config
        if self.distributed:
            self._join_ranks()
        for split in ("train", "val"):
            if len(getattr(data, split)) == 0:
                raise UsageError(f"the dataset's {split} split is empty")
        if c.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # What runs the forward pass: the model itself, or its compiled form (same parameters).
        self.forward_model: nn.Module = self._compiled(self.model) if c.compile else self.model
        self.autocast = autocast_for(c.precision, self.device)
        batching = dict(mean=data.mean, std=data.std, channels_last=c.channels_last, num_workers=c.num_workers,
                        rank=self.rank, world_size=self.world_size)
        self.train_batches = Batches(data.train, c.batch_size, self.device, shuffle=True, seed=c.seed, **batching)
        self.val_batches = Batches(data.val, c.batch_size, self.device, shuffle=False, **batching)
        self.stepper: Stepper | None = None
        self._compiling = c.compile
        self.signals = StopOnSignal(self.request_stop)
        #: ``True`` silences :meth:`echo` (``trainer run -q``).
        self.quiet = False
        self.train_forward = self.forward_model  # what training calls: DistributedDataParallel's wrapper when distributed
        self._wrapped: list[int] = []  # the trainable parameters DDP was built for
        self._ddp: torch.nn.parallel.DistributedDataParallel | None = None  # the wrapper, when distributed
        self._stop_vote: str | None = None  # a stop this rank asked for, not yet agreed with the others
        self._pending: list[torch.Tensor] = []  # detached batch losses since the last log
        self._pending_sizes: list[int] = []
        self._carried_loss, self._carried_samples = 0.0, 0  # an interval's part from before a resume
        self._epoch_loss = 0.0  # this epoch's loss sum and samples, already read back
        self._epoch_samples = 0

    # -- what plugins call ---------------------------------------------------

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and prints (rank zero)."""
        return self.rank == 0

    def echo(self, message: str) -> None:
        """Print ``message``, a line for the person watching the run, on the main
        process only, unless the run is quiet (``trainer run -q``).  Plugins print
        their notices through it, so that ``-q`` silences every one of them and no
        rank repeats rank zero's."""
        if self.is_main and not self.quiet:
            print(message, flush=True)

    @property
    def run_path(self) -> Path | None:
        """The run folder, or ``None`` when this run writes no files."""
        return self.run_dir.path if self.run_dir is not None else None

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop after the current step (or at the end of the current epoch's evaluation).

        In a run of several processes every rank must stop at the same step: the
        request takes effect at the next training-loss log (``--log-every``) or
        epoch end, on all ranks together, whichever rank asked.
        """
        if self.distributed:
            self._stop_vote = self._stop_vote or reason
            return
        self.state.should_stop = True
        self.state.stop_reason = reason

    def all_reduce(self, tensor: torch.Tensor, op: distributed.ReduceOp = "sum") -> torch.Tensor:
        """Combine ``tensor`` in place across the ranks of a distributed run
        (``sum``, ``max`` or ``min``) and return it; in one process it is
        returned as is.  Every rank must call it at the same point: a plugin
        reduces what it gathered in ``on_eval_batch`` in ``collect_eval_metrics``."""
        return distributed.all_reduce(tensor, op)

    def barrier(self) -> None:
        """Wait until every rank gets here (nothing in one process)."""
        distributed.barrier()

    def rank_random_states(self) -> list[dict[str, object]]:
        """Every rank's random state, in rank order, for :meth:`checkpoint_state`.
        In a run of several processes every rank must call it (it gathers)."""
        return distributed.all_gather_state(rng_state())

    def checkpoint_state(self, rank_random_states: list[dict[str, object]] | None = None) -> dict[str, Any]:
        """Everything the run's future depends on, keyed for :meth:`load_checkpoint_state`.

        :param rank_random_states: :meth:`rank_random_states`, so that every rank of
            a resumed run of as many processes continues its own random stream;
            without it, ranks other than zero start fresh streams on resume.
        """
        return {
            "format": FORMAT,
            "trainer_core": __version__,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "plugins": {name: s for name, s in call_each(self.pm, "plugin_state_dict", trainer=self).items() if s is not None},
            "state": self.state.state_dict(),
            "stepper": self.stepper.state_dict() if self.stepper is not None else None,
            "epoch_totals": [self._epoch_loss, self._epoch_samples],
            "pending": [self._interval_loss_sum(), self._interval_samples()],
            "rng": rng_state(),
            "rank_rng": rank_random_states,
            "config": self.config.to_toml(),
        }

    def save_checkpoint(self, path: Path) -> None:
        """Write :meth:`checkpoint_state` to ``path`` atomically.  In a run of
        several processes every rank calls it: rank zero writes, and all wait
        until the file is complete."""
        rank_states = self.rank_random_states() if self.distributed else None
        if self.is_main:
            save_checkpoint(path, self.checkpoint_state(rank_states))
        distributed.barrier()

    def load_checkpoint_state(self, payload: Mapping[str, Any]) -> None:
        """Restore model, optimizer, progress, RNG and plugin state from a checkpoint."""
        try:
            self.model.load_state_dict(payload["model"])
        except RuntimeError:
            raise UsageError(_misfit(self.model.state_dict(), payload["model"])) from None
        self.state.load_state_dict(payload["state"])
        self.state.should_stop, self.state.stop_reason = False, None
        self._epoch_loss, self._epoch_samples = payload["epoch_totals"]
        self._pending, self._pending_sizes = [], []
        self._carried_loss, self._carried_samples = payload["pending"]
        # Plugin state before the optimizer's: a plugin that added parameter groups
        # (freeze's unfreezing) rebuilds them so the saved optimizer state fits.
        saved = payload.get("plugins", {})
        for impl in self.pm.hook.load_plugin_state.get_hookimpls():
            if impl.plugin_name in saved:
                kwargs = {"trainer": self, "state": saved[impl.plugin_name]}
                impl.function(**{a: kwargs[a] for a in impl.argnames})
        if self.optimizer is not None and payload.get("optimizer") is not None:
            try:
                self.optimizer.load_state_dict(payload["optimizer"])
            except ValueError as exc:
                raise UsageError(f"checkpoint's optimizer state does not fit this run's parameters: {_first_line(exc)}") from None
        if self.stepper is not None and payload.get("stepper"):
            self.stepper.load_state_dict(payload["stepper"])
        rank_states = payload.get("rank_rng")
        if rank_states is not None and len(rank_states) == self.world_size:
            set_rng_state(rank_states[self.rank])
        else:
            set_rng_state(payload["rng"])
            if self.rank > 0:  # saved by another number of processes (or by rank zero alone): fresh streams
                seed_everything(distributed.rank_seed(self.config.seed, self.rank) + self.state.step)
        if self._carried_samples and self.state.batch_idx % self.config.log_every_n_steps == 0:
            # Saved in on_batch_end of a logging step, before its log: emit that log now, as the first run did.
            self._log_interval()

    # -- the loop ------------------------------------------------------------

    def fit(self) -> TrainState:
        """Train for ``config.epochs`` epochs (or until a plugin stops the run)."""
        status, error = "completed", None
        started = time.perf_counter()
        self.state.started_at = self.state.started_at or time.time()  # (a resume then restores the first start)
        try:
            with self.signals:
                self._fit()
            status = "stopped" if self.state.should_stop else status
            return self.state
        except BaseException as exc:
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            error = f"{type(exc).__name__}: {exc}"
            self._notify_exception(exc)
            # A second Ctrl-C lands in whatever code runs, a plugin's too: that is no fault of the plugin.
            blame = isinstance(exc, Exception) and not isinstance(exc, TrainerError)
            fault = locate_fault(self.pm, exc.__traceback__) if blame else None
            if fault is not None:
                raise PluginError(f"plugin '{fault[0]}' failed in {fault[1]}: {type(exc).__name__}: {exc}") from exc
            raise
        finally:
            if self.run_dir is not None:
                try:
                    if self.is_main:
                        self.run_dir.write_summary(run_summary(self, status, time.perf_counter() - started, error))
                except TrainerError as exc:  # a full disk: the run's own error, if any, says more
                    if error is None:
                        raise
                    log.warning("%s", exc)
                finally:
                    self.run_dir.close()

    def _fit(self) -> None:
        self._emit("on_setup", trainer=self)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise UsageError("the model has no trainable parameters (every parameter is frozen)")
        if self.distributed:
            self._wrap_for_ranks()
        self.optimizer = OPTIMIZERS[self.config.optimizer](params, self.config)
        self._hot = {name: direct_caller(self.pm, name) for name in hook_names()}
        deferring = self._ddp is not None and self.config.accumulate_grad_batches > 1  # (see _train_epoch)
        self.stepper = Stepper(self.config, self.device, self.optimizer, self._hot["on_before_optimizer_step"],
                               self._average_gradients if deferring else None)
        self._emit("on_fit_start", trainer=self)
        if self.resume is not None:
            self.load_checkpoint_state(self.resume)
            self.resume = None  # restored: no second copy of the weights and optimizer state for the whole run
            if self.run_dir is not None and self.is_main:
                self.run_dir.truncate_metrics(self.state.step)
        while not self.state.should_stop and self._next_epoch():
            if self.state.batch_idx < len(self.train_batches):  # else: resumed between its training and evaluation
                self._train_epoch()
            if self.state.should_stop and self.state.batch_idx < len(self.train_batches):
                break  # stopped mid-epoch: no evaluation of a partial epoch
            if not self.evaluate():
                break  # a signal cut the evaluation short
            self._emit("on_epoch_end", trainer=self, epoch=self.state.epoch)
            if self.distributed:  # also waits for rank zero's end-of-epoch files (checkpoints)
                self._agree()
        self._emit("on_fit_end", trainer=self)

    def _next_epoch(self) -> bool:
        """Move to the next epoch unless one is part-way (a mid-epoch resume, or a resume
        of an epoch whose evaluation a signal cut short); False when done."""
        state = self.state
        if state.epoch > 0 and (state.batch_idx < len(self.train_batches) or state.metrics.get("epoch") != state.epoch):
            return True
        if state.epoch >= self.config.epochs:
            return False
        state.epoch += 1
        state.batch_idx = 0
        return True

    def _train_epoch(self) -> None:
        hot, state, stepper = self._hot, self.state, self.stepper
        assert stepper is not None
        batch_start, before_backward, batch_end = hot["on_batch_start"], hot["on_before_backward"], hot["on_batch_end"]
        log_every, last = self.config.log_every_n_steps, len(self.train_batches) - 1
        uneven, scale, uneven_size = self.train_batches.uneven or (-1, 1.0, 0)
        first = state.batch_idx
        if first == 0:
            self._epoch_loss, self._epoch_samples = 0.0, 0
        self.model.train()
        self._emit("on_epoch_start", trainer=self, epoch=state.epoch)
        if self.distributed and self._trainable() != self._wrapped:
            self._wrap_for_ranks()  # a plugin (un)froze parameters: DDP must reduce the new set
        model = self.train_forward
        # While gradients accumulate, the ranks need not average them: only the batch that steps
        # all-reduces (what DistributedDataParallel.no_sync does, decided before each forward pass).
        defer_sync = self._ddp if self._ddp is not None and stepper.accumulate > 1 else None
        # CUDA graphs replay into the same output buffers, and a plugin may keep a batch's outputs
        # past its step (tensorboard's training accuracy): hand it a copy then.
        graphed = self.config.compile and self.config.compile_mode == "reduce-overhead"
        kept = (lambda outputs: outputs.detach().clone()) if graphed else torch.Tensor.detach
        started = time.perf_counter()
        for batch_idx, (inputs, targets) in enumerate(self.train_batches.iterate(state.epoch, first, self._stopped_by_signal), first):
            if batch_start:
                batch_start(trainer=self, batch_idx=batch_idx, inputs=inputs, targets=targets)
            if defer_sync is not None:
                defer_sync.require_backward_grad_sync = stepper.will_step(batch_idx == last)
            with self.autocast():
                outputs = model(inputs)
                loss = self.loss_fn(outputs, targets)
            if before_backward:
                before_backward(trainer=self, loss=loss)
            counted = stepper.backward_and_step(loss if batch_idx != uneven else loss * scale, batch_idx == last, self)
            state.step += 1
            state.batch_idx = batch_idx + 1
            loss = loss.detach()
            if counted:
                self._pending.append(loss)
                self._pending_sizes.append(targets.shape[0] if batch_idx != uneven else uneven_size)
            if self._compiling:  # the first step of a compiled model is mostly compilation
                self._compiling = False
                state.compile_seconds = time.perf_counter() - started
                started = time.perf_counter()
            if batch_end:
                batch_end(trainer=self, batch_idx=batch_idx, inputs=inputs, targets=targets, outputs=kept(outputs),
                          loss=loss, optimizer_stepped=stepper.stepped)
            if state.batch_idx % log_every == 0:
                self._log_interval()
            if state.should_stop:
                break
        if defer_sync is not None:
            defer_sync.require_backward_grad_sync = True
        # The epoch's last, partial interval.  A run stopped mid-epoch keeps it pending (its
        # checkpoint carries it), so a resumed run logs the same intervals as one never stopped.
        if (self._pending or self._carried_samples) and state.batch_idx == len(self.train_batches):
            self._log_interval()  # (pending steps, not samples: the same on every rank, whose part may be empty)
        state.train_seconds += time.perf_counter() - started

    def _log_interval(self) -> None:
        """Read the interval's losses back (the one host sync) and emit ``on_train_log``."""
        total, samples = self._interval_loss_sum(), self._interval_samples()
        if self.distributed:  # the part carried from a checkpoint is on every rank: count it once
            reduced = self._agree(total - self._carried_loss, samples - self._carried_samples)
            total, samples = self._carried_loss + reduced[0], self._carried_samples + int(reduced[1])
        self._pending.clear()
        self._pending_sizes.clear()
        self._carried_loss, self._carried_samples = 0.0, 0
        if not samples:  # every batch of the interval was skipped for a non-finite loss: no loss to report
            return
        if not math.isfinite(total):
            raise TrainerError(
                f"training loss became {total} in epoch {self.state.epoch} by step {self.state.step}; "
                "lower the learning rate or check the data"
            )
        self._epoch_loss += total
        self._epoch_samples += samples
        self.state.train_samples += samples
        self._emit(
            "on_train_log",
            trainer=self,
            metrics={"train/loss": total / samples, "train/samples": float(samples), "lr": self.lr},
        )

    def _interval_loss_sum(self) -> float:
        if not self._pending:
            return self._carried_loss
        # One read-back for the interval; weighted and summed in double precision on the host.
        losses = torch.stack(self._pending).tolist()
        return self._carried_loss + math.fsum(loss * size for loss, size in zip(losses, self._pending_sizes))

    def _interval_samples(self) -> int:
        return self._carried_samples + sum(self._pending_sizes)

    @property
    def lr(self) -> float:
        """The learning rate of the optimizer's first parameter group."""
        return float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else self.config.lr

    def _stopped_by_signal(self) -> bool:
        """Whether a signal asks this process to stop now (ranks of a distributed run stop together, at an epoch's end)."""
        return self.signals.received is not None and not self.distributed

    def evaluate(self) -> dict[str, float]:
        """Run the validation split, merge every plugin's metrics, record and emit them.

        Returns an empty mapping, recording nothing, when a signal arrives mid-evaluation.
        """
        model = self.forward_model  # never DDP's wrapper: evaluation needs no gradient reduction
        # Called mid-epoch by a plugin, training must go on in the modes it had (frozen batch norm included).
        modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()
        if self.distributed:  # batch-norm statistics drift apart per rank: evaluate rank zero's, the saved ones
            distributed.broadcast_buffers(self.model)
        self._emit("on_eval_start", trainer=self)
        eval_batch = direct_caller(self.pm, "on_eval_batch")
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        with torch.no_grad():
            for inputs, targets in self.val_batches.iterate(stopping=self._stopped_by_signal):
                if self._stopped_by_signal():
                    return {}
                with self.autocast():
                    outputs = model(inputs)
                loss_sum += self.loss_fn(outputs.float(), targets).double() * targets.shape[0]
                correct += (outputs.argmax(dim=1) == targets).sum()
                if eval_batch:
                    eval_batch(trainer=self, inputs=inputs, targets=targets, outputs=outputs)
        if self._stopped_by_signal():  # the loader's workers got the signal too and ended the pass early
            return {}
        size = self.val_batches.size
        if self.distributed:  # sums over the ranks' disjoint parts of the split, then divide
            loss_sum, correct = distributed.all_reduce(torch.stack([loss_sum, correct.double()]))
        metrics: dict[str, float] = {
            "epoch": self.state.epoch,
            "step": self.state.step,
            "train/loss": self._epoch_loss / self._epoch_samples if self._epoch_samples else math.nan,
            "val/loss": loss_sum.item() / size,
            "val/acc": correct.item() / size,
        }
        producers = dict.fromkeys(metrics, "the core")
        for plugin, extra in call_each(self.pm, "collect_eval_metrics", trainer=self).items():
            for key, value in (extra or {}).items():
                if key in producers:
                    raise PluginError(f"metric '{key}' is produced by both {producers[key]} and plugin '{plugin}'; rename one")
                producers[key] = f"plugin '{plugin}'"
                metrics[key] = float(value)
        if self.distributed:  # rank zero's, also for metrics of its rank-zero-only plugins
            metrics = distributed.broadcast_object(metrics)
        self.state.metrics = metrics
        self.state.history.append(metrics)
        if self.run_dir is not None and self.is_main:
            self.run_dir.append_metrics(metrics)
        self._emit("on_eval", trainer=self, metrics=metrics)
        for module, training in modes:
            module.training = training
        return metrics

    # -- several processes ---------------------------------------------------

    def _join_ranks(self) -> None:
        """Checks and settings of one rank of a distributed run."""
        c = self.config
        distributed.check_config(c)
        if self.rank > 0:
            for plugin in [p for p in self.pm.get_plugins() if distributed.is_rank_zero_only(p)]:
                self.pm.unregister(plugin)
        # Same initial weights everywhere (built before this), distinct random streams per rank.
        seed_everything(distributed.rank_seed(c.seed, self.rank))

    def _trainable(self) -> list[int]:
        return [id(p) for p in self.model.parameters() if p.requires_grad]

    def _average_gradients(self) -> None:
        distributed.average_gradients(self.model.parameters())

    def _compiled(self, module: nn.Module) -> nn.Module:
        return torch.compile(module, mode=self.config.compile_mode)  # type: ignore[return-value]

    def _wrap_for_ranks(self) -> None:
        """Train through DistributedDataParallel, which averages gradients across
        ranks during ``backward``.  ``self.model`` stays the plain module, so
        plugins and checkpoints see the same parameter names in any world size."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        wrapped = self._ddp = DistributedDataParallel(self.model, device_ids=ids)
        self.train_forward = self._compiled(wrapped) if self.config.compile else wrapped
        self._wrapped = self._trainable()

    def _agree(self, *sums: float) -> list[float]:
        """Sum ``sums`` over the ranks and agree on a stop any rank asked for
        (the ranks must stop at the same step)."""
        values = torch.tensor([*sums, self._stop_vote is not None], dtype=torch.float64, device=self.device)
        values = distributed.all_reduce(values).tolist()
        if values[-1]:
            reasons = distributed.all_gather_object(self._stop_vote)
            rank_ = next(r for r, reason in enumerate(reasons) if reason is not None)
            self.state.should_stop = True
            self.state.stop_reason = reasons[rank_] if rank_ == 0 else f"{reasons[rank_]} (on rank {rank_})"
            self._stop_vote = None
        return values[:-1]

    # -- plumbing ------------------------------------------------------------

    def _emit(self, name: str, **kwargs: Any) -> None:
        getattr(self.pm.hook, name)(**kwargs)

    def _notify_exception(self, exc: BaseException) -> None:
        for impl in self.pm.hook.on_exception.get_hookimpls():
            kwargs = {"trainer": self, "exception": exc}
            try:
                impl.function(**{a: kwargs[a] for a in impl.argnames})
            except Exception as inner:  # must not hide the exception that ended the run
                log.warning("plugin '%s' failed in on_exception: %s: %s", impl.plugin_name, type(inner).__name__, inner)


def _misfit(own: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor]) -> str:
    """Why a checkpoint's weights do not load: the keys that differ, a few of each kind."""
    shapes = [f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in saved and saved[k].shape != v.shape]
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    parts = [f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
             for label, keys in (("shape in checkpoint vs model", shapes), ("missing", missing), ("unexpected", unexpected)) if keys]
    return (f"checkpoint does not fit this model ({'; '.join(parts)}): resume with the same model and classes, or start "
            "from its weights with a new head with -o model.weights=PATH")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0]
