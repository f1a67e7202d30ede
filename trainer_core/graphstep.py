"""The whole training step replayed from CUDA graphs (``cuda_graph = true``, ``trainer run --cuda-graph``).

A small model's GPU step can take less time than the host needs to launch its
kernels one by one: the seed CNN at batch 512 trained at 195,000-266,000
samples/s eager on an H200, and at 662,000-667,000 replayed from one graph
(BENCHMARKS.md).  :class:`GraphStep` captures what the loop does for a batch
and replays it, in two graphs: the draw (indices from the epoch's order on the
device, the batch gathered from the split held there and normalised into
static buffers), then the step (forward, loss, backward, optimizer step).
``on_batch_start`` runs between the two and sees the batch as it does eagerly.

What makes replaying the same as running:

* Every replay reads and writes the same memory.  What a plugin may keep past
  its step (``on_batch_end``'s inputs, targets and outputs; the loss the loop
  logs) is handed out as a copy.
* Python inside the step runs once, when it is captured: a run whose plugins
  implement ``on_before_backward`` or ``on_before_optimizer_step``, or whose
  modules carry hooks, runs eager (:func:`eager_reason`).
* Numbers are captured as they are.  Adam and AdamW run ``capturable``, their
  learning rate held in a device tensor that follows ``param_group["lr"]``
  before each step; SGD's learning rate is a number inside its kernels, so a
  change captures the step again.  The trainable parameters, the optimizer's
  other settings and the modules' train/eval modes are compared at each
  epoch's start, and a change captures again too.  A graph replaced after fewer
  than :data:`MIN_REPLAYS` replays (a per-step schedule of SGD's rate) would
  cost more than it saves: the rest of the run is then eager.
* The first :data:`WARMUP_STEPS` steps (and those after a new capture is
  needed) are real training steps run eagerly on a side stream, so that the
  optimizer's state and cuDNN's and cuBLAS's first calls exist before capture.
  The epoch's last, partial batch, whose shape differs, runs eagerly too.

The losses are those of the eager loop, step for step: the draw and the step
are the loop's own code (``Batches``' normalisation, ``Stepper``), run on the
same values.  Adam's capturable form computes its bias corrections on the
device, which rounds differently from the host's: the same as eager Adam
constructed with ``capturable=True``, not bit for bit the default.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator

import torch
from torch import nn

from trainer_core.errors import UsageError
from trainer_core.stepping import PRECISIONS

if TYPE_CHECKING:
    from trainer_core.trainer import Trainer

log = logging.getLogger("trainer_core")

#: Eager steps before a capture: PyTorch's examples warm up with 3.
WARMUP_STEPS = 3
#: A graph replaced after fewer replays than this makes the rest of the run eager.
MIN_REPLAYS = 20
# Hooks whose implementations would run inside the captured step.
HOST_HOOKS = ("on_before_backward", "on_before_optimizer_step")
MODULE_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")

Batch = tuple[torch.Tensor, torch.Tensor]


def step_reason(trainer: Trainer) -> str | None:
    """Why the steps of ``trainer``'s run cannot be captured whatever the device, in a few
    words (:func:`eager_reason` adds the device); ``None`` when they can."""
    c, batches = trainer.config, trainer.train_batches
    if trainer.distributed:
        return f"a run of {trainer.world_size} processes exchanges gradients inside the step"
    if c.compile:
        return "--compile captures graphs of its own (--compile-mode reduce-overhead); use one or the other"
    if batches.tensors is None:
        return "the training split is read through a DataLoader, not held in memory"
    if batches.tensors.augment is not None:
        return "the training split augments each batch (random crops and flips) outside the step"
    if c.accumulate_grad_batches > 1:
        return f"accumulate_grad_batches = {c.accumulate_grad_batches} steps the optimizer only every few batches"
    if c.nonfinite == "skip":
        return "nonfinite = skip reads every loss back to the host"
    if c.precision == "16":
        return "precision 16's gradient scaler reads back to the host every step"
    for hook in HOST_HOOKS:
        for impl in getattr(trainer.pm.hook, hook).get_hookimpls():
            return f"plugin '{impl.plugin_name}' implements {hook}, which runs host code inside the step"
    if batches.size < batches.share:
        return f"the training split ({batches.size} samples) is smaller than one batch ({batches.share})"
    return None


def eager_reason(trainer: Trainer) -> str | None:
    """Why ``trainer``'s run cannot replay its steps from CUDA graphs, in a few words; ``None`` when it can."""
    if trainer.device.type != "cuda":
        return f"the device is {trainer.device.type}, not a CUDA GPU"
    return step_reason(trainer)


def graph_step_for(trainer: Trainer) -> GraphStep | None:
    """A :class:`GraphStep` for ``trainer`` when its config asks for one and the run allows it;
    otherwise ``None``, after a warning line that says why the run goes on eager."""
    if not trainer.config.cuda_graph:
        return None
    reason = eager_reason(trainer)
    if reason is None:
        return GraphStep(trainer)
    if trainer.is_main:
        log.warning("cuda-graph: %s; running eager", reason)
    return None


def hooked_module(model: nn.Module) -> str | None:
    """The name of the first module of ``model`` with forward or backward hooks, whose Python
    would run only when the step is captured; ``None`` when no module has any."""
    for name, module in model.named_modules():
        if any(getattr(module, hooks, None) for hooks in MODULE_HOOKS):
            return name or type(module).__name__
    return None


def _saved_as_eager(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A state-dict hook: checkpoints hold the optimizer as the eager loop builds it (not
    capturable, its step counts on the host), so that either mode resumes from them."""
    for group in state["param_groups"]:
        group["capturable"] = False
    state["state"] = {key: {**value, "step": value["step"].cpu()} if "step" in value else value
                      for key, value in state["state"].items()}
    return state


class GraphStep:
    """The loop's training batches and steps, replayed from CUDA graphs.

    The loop iterates :meth:`batches` instead of its ``Batches`` and calls
    :meth:`step` for each batch instead of running the step itself.

    :param trainer: the trainer whose loop calls it; its config must allow it
        (:func:`step_reason`), else :class:`~trainer_core.UsageError`.
    :param capture: capture and replay graphs (the default on a CUDA device).
        ``False`` runs the very steps the graphs would hold eagerly, on the
        same static buffers: what the CPU tests compare with the eager loop.

    :ivar replaying: whether graphs are (still) in use: ``False`` with
        ``capture=False`` or after the run went eager for a reason it logged.
    :ivar captures: how many times the step has been captured.
    """

    def __init__(self, trainer: Trainer, capture: bool | None = None) -> None:
        reason = step_reason(trainer)
        if reason is not None:
            raise UsageError(f"cannot replay this run's steps from CUDA graphs: {reason}")
        self.trainer = trainer
        self.device = trainer.device
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise UsageError(f"CUDA graphs need a CUDA device, not {self.device.type} (capture=False runs the steps eagerly)")
        self.train = trainer.train_batches
        self.full_steps = self.train.size // self.train.share  # batches of the static shape in an epoch
        dtype = PRECISIONS[trainer.config.precision]
        # Autocast's cache of cast weights would hand a graph tensors freed after its capture.
        self.autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext if dtype is None else functools.partial(
            torch.autocast, self.device.type, dtype=dtype, cache_enabled=False)
        self.replaying = self.capture
        self.captures = 0
        self._started = False

    # -- what the loop calls -------------------------------------------------

    def batches(self, epoch: int, first: int = 0) -> Iterator[Batch]:
        """The training batches of ``epoch`` from batch ``first`` on, as ``Batches.iterate``
        yields them: the full ones in the static buffers, the last, partial one afresh."""
        if not self._started:
            self._start()
        settings = self._settings()
        if settings != self._seen_settings:  # (a plugin froze, unfroze or added parameters, or changed a mode)
            self._drop("the trainable parameters, the optimizer's settings or the modules' modes", warm_again=True)
            self._track_groups()
            settings = self._settings()
        self._seen_settings = settings
        train, share = self.train, self.train.share
        order = train.local_order(epoch)
        self._order.copy_(order[: self.full_steps * share].view(self.full_steps, share))
        self._position.fill_(first)
        for _ in range(first, self.full_steps):
            if self._draw_graph is not None:
                self._draw_graph.replay()
            else:
                self._draw()
            yield self.inputs, self.targets
        tail = order[max(first, self.full_steps) * share :]
        if len(tail):
            index = tail.to(self.device)
            yield train._normalise(self._split.inputs[index]), self._split.targets[index]

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          torch.Tensor, bool]:
        """Train on a batch from :meth:`batches`.  Return what the loop passes on:
        ``(inputs, targets, outputs, loss, True)`` (every step is counted), copies where
        plugins could keep a buffer the next step overwrites, the loss detached and fresh."""
        if self._follow_lr():
            self._drop("SGD's learning rate")
        if inputs is not self.inputs:  # the epoch's last, partial batch
            outputs, loss = self._train_step(inputs, targets)
            return inputs, targets, outputs, loss, True
        if self._step_graph is not None:
            self._step_graph.replay()
            self._replays += 1
            outputs, loss = self._outputs.clone() if self.keep else self._outputs, self._loss.clone()
        elif not self.replaying:
            outputs, loss = self._train_step(inputs, targets)
        elif self._warm < WARMUP_STEPS:
            outputs, loss = self._warm_up()
        else:
            outputs, loss = self._capture()
        if self.keep:
            return inputs.clone(), targets.clone(), outputs, loss, True
        return inputs, targets, outputs, loss, True

    # -- setting up ----------------------------------------------------------

    def _start(self) -> None:
        """Take the optimizer as ``_fit`` built it (and a resume loaded it) and allocate the static buffers."""
        trainer, optimizer = self.trainer, self.trainer.optimizer
        assert optimizer is not None and trainer.stepper is not None, "GraphStep.batches before the optimizer exists"
        self._started = True
        self.optimizer, self.stepper = optimizer, trainer.stepper
        self.stepper.stepped = True  # every step of this mode ends in an optimizer step
        self.keep = bool(trainer.pm.hook.on_batch_end.get_hookimpls())
        # Captured, Adam reads its learning rate from the device; its eager steps here use the same form.
        self._tensor_lr = self.device.type == "cuda" and isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
        self._lrs: list[float] = []
        self._lr_tensors: list[torch.Tensor] = []
        self._track_groups()
        if self._tensor_lr:
            optimizer.defaults["capturable"] = True
            # torch warns once when a capturable optimizer steps uncaptured: here those are the warm-up steps.
            optimizer._warned_capturable_if_run_uncaptured = True  # type: ignore[attr-defined]
            for state in optimizer.state.values():  # a resumed run's step counts, kept on the host eagerly
                if "step" in state:
                    state["step"] = state["step"].to(self.device, torch.float32)
            optimizer.register_state_dict_post_hook(_saved_as_eager)
        self._split = self.train.tensors
        assert self._split is not None
        share = self.train.share
        self.inputs = torch.empty_like(self.train._normalise(self._split.inputs[:share]))  # (its memory format too)
        self.targets = torch.empty_like(self._split.targets[:share])
        self._order = torch.empty(self.full_steps, share, dtype=torch.int64, device=self.device)
        self._position = torch.zeros(1, dtype=torch.int64, device=self.device)  # the next batch's row of _order
        self._stream = torch.cuda.Stream(self.device) if self.capture else None
        self._draw_graph: torch.cuda.CUDAGraph | None = None
        self._step_graph: torch.cuda.CUDAGraph | None = None
        self._outputs = self._loss = torch.empty(0)
        self._warm = self._replays = 0
        self._seen_settings = self._settings()

    def _track_groups(self) -> None:
        """Follow the learning rate of parameter groups added since the last call (all, the first time)."""
        for group in self.optimizer.param_groups[len(self._lrs) :]:
            self._lrs.append(group["lr"])
            if self._tensor_lr:
                group["capturable"] = True
                self._lr_tensors.append(torch.tensor(group["lr"], device=self.device))

    def _settings(self) -> tuple[Any, ...]:
        """What a captured step depends on besides the learning rate, to compare at an epoch's start."""
        model = self.trainer.model
        groups = tuple(tuple((key, tuple(map(id, value)) if key == "params" else
                              id(value) if isinstance(value, torch.Tensor) else value)
                             for key, value in group.items() if key != "lr") for group in self.optimizer.param_groups)
        return (tuple((id(p), p.requires_grad) for p in model.parameters()),
                tuple(module.training for module in model.modules()), groups)

    # -- one step --------------------------------------------------------------

    def _draw(self) -> None:
        """The next batch of the epoch's order into the static buffers (what the draw graph holds)."""
        index = self._order.index_select(0, self._position).view(-1)
        self._position.add_(1)
        self.inputs.copy_(self.train._normalise(self._split.inputs[index]))
        self.targets.copy_(self._split.targets[index])

    def _train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loop's eager step (what the step graph holds): forward, loss, the ``Stepper``'s
        backward and optimizer step; returns the detached outputs and loss."""
        trainer = self.trainer
        with self.autocast():
            outputs = trainer.train_forward(inputs)
            loss = trainer.task.loss(outputs, targets)
        with self._device_lrs():
            self.stepper.backward_and_step(loss, True, trainer)
        return outputs.detach(), loss.detach()

    @contextlib.contextmanager
    def _device_lrs(self) -> Iterator[None]:
        """Adam's learning rates as device tensors while it steps; plugins see numbers otherwise."""
        groups = self.optimizer.param_groups
        for group, lr in zip(groups, self._lr_tensors):
            group["lr"] = lr
        try:
            yield
        finally:
            for group, lr in zip(groups, self._lrs):
                group["lr"] = lr

    def _follow_lr(self) -> bool:
        """Bring the device learning rates to ``param_group["lr"]`` (a plugin may have set it);
        ``True`` when a rate captured as a number (SGD's) changed."""
        changed = False
        for i, group in enumerate(self.optimizer.param_groups[: len(self._lrs)]):
            lr = group["lr"]
            if lr != self._lrs[i]:
                self._lrs[i] = lr
                if self._lr_tensors:
                    self._lr_tensors[i].fill_(lr)
                else:
                    changed = True
        return changed

    def _warm_up(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A real step run eagerly on the side stream that captures will use."""
        assert self._stream is not None
        self._warm += 1
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            result = self._train_step(self.inputs, self.targets)
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        return result

    def _capture(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Capture the draw (once) and the step, then replay the step: this batch is drawn already."""
        hooked = hooked_module(self.trainer.model)
        if hooked is not None:
            self._give_up(f"module '{hooked}' has hooks, Python that would run only when the step is captured")
            return self._train_step(self.inputs, self.targets)
        try:
            if self._draw_graph is None:
                self._draw_graph = self._captured(self._draw)[0]
            self._step_graph, (self._outputs, self._loss) = self._captured(
                lambda: self._train_step(self.inputs, self.targets))
        except RuntimeError as exc:  # host work inside the step (an .item(), a sync): the step did not run
            self.optimizer.zero_grad(set_to_none=True)  # gradients the capture left unfilled
            first_line = (str(exc).strip().splitlines() or [""])[0]
            self._give_up(f"capturing the step failed ({type(exc).__name__}: {first_line})")
            return self._train_step(self.inputs, self.targets)
        self.captures += 1
        self._replays = 1
        self._step_graph.replay()
        return self._outputs.clone() if self.keep else self._outputs, self._loss.clone()

    def _captured(self, work: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
        graph = torch.cuda.CUDAGraph()
        # The outer context restores the current stream even when a failed capture leaves its own set.
        with torch.cuda.stream(torch.cuda.current_stream(self.device)), torch.cuda.graph(graph, stream=self._stream):
            result = work()
        return graph, result

    def _drop(self, what: str, warm_again: bool = False) -> None:
        """Forget the step's graph, whose ``what`` changed, to capture it again (after
        new warm-up steps with ``warm_again``: new parameters need their optimizer state)."""
        if self._step_graph is not None and self._replays < MIN_REPLAYS:
            self._give_up(f"{what} changed {self._replays} step(s) after the step was captured; "
                          "capturing that often costs more than it saves")
        self._step_graph, self._outputs, self._loss = None, torch.empty(0), torch.empty(0)
        if warm_again:
            self._warm = 0

    def _give_up(self, reason: str) -> None:
        """Run the rest of the run eagerly (the same steps on the same buffers), saying why once."""
        if self.trainer.is_main:
            log.warning("cuda-graph: %s; running eager", reason)
        self.replaying = False
        self._draw_graph = self._step_graph = None
