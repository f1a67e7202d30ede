"""How a run spreads over processes: the one object the loop calls for anything
that crosses ranks.

:class:`Strategy` is one process, where every call is the identity or nothing;
:class:`DDP` trains in several processes through PyTorch's
``DistributedDataParallel``.  The loop reads the same with either, and a
sharding strategy (FSDP) fits beside them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from trainer_core import distributed
from trainer_core.runtime import seed_everything

if TYPE_CHECKING:
    import pluggy

    from trainer_core.config import RunConfig
    from trainer_core.state import TrainState


class Strategy:
    """One process: nothing to wrap, reduce or agree on."""

    name = "single"
    distributed = False

    def __init__(self, device: torch.device, compile_fn: Callable[[nn.Module], nn.Module] | None = None) -> None:
        """:param device: this process's device.
        :param compile_fn: what ``--compile`` applies to the module training calls."""
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.device = device
        self.compile_fn = compile_fn

    def join(self, config: RunConfig, pm: pluggy.PluginManager) -> None:
        """Checks and settings of this process, when the trainer is built."""

    def prepare(self, model: nn.Module, forward: nn.Module) -> nn.Module:
        """The module a training step calls (``forward`` is the model, or its
        compiled form); called before each epoch, so a change of the trainable
        parameters (unfreezing) is seen."""
        return forward

    def gradient_sync(self, accumulate: int) -> Callable[[bool], None] | None:
        """A switch for whether the next backward pass averages gradients over
        the ranks (``None`` when there is nothing to switch)."""
        return None

    def average_gradients(self, model: nn.Module) -> None:
        """Average the gradients over the ranks now (a step whose last batch skipped the sync)."""

    def request_stop(self, state: TrainState, reason: str) -> None:
        """Stop after the current step: at once in one process."""
        state.should_stop, state.stop_reason = True, reason

    def agree(self, state: TrainState, *sums: float) -> list[float]:
        """Sum ``sums`` over the ranks and agree on a stop any rank asked for."""
        return list(sums)

    def all_reduce(self, tensor: torch.Tensor, op: distributed.ReduceOp = "sum") -> torch.Tensor:
        """``tensor`` combined over the ranks, in place."""
        return distributed.all_reduce(tensor, op)

    def share_buffers(self, model: nn.Module) -> None:
        """Give every rank rank zero's buffers (batch-norm statistics) before an evaluation."""

    def share_object(self, obj: Any) -> Any:
        """Rank zero's ``obj`` on every rank."""
        return obj

    def barrier(self) -> None:
        """Wait until every rank gets here."""

    def gather(self, state: dict[str, object]) -> list[dict[str, object]]:
        """Every rank's ``state`` (tensors included), in rank order."""
        return [state]

    def teardown(self) -> None:
        """Release what wraps the model (before the process group ends)."""


class DDP(Strategy):
    """Several processes with ``DistributedDataParallel``, which averages
    gradients during ``backward``.  The model stays the plain module for plugins
    and checkpoints, so parameter names are the same in any world size."""

    name = "ddp"
    distributed = True

    def __init__(self, device: torch.device, compile_fn: Callable[[nn.Module], nn.Module] | None = None) -> None:
        super().__init__(device, compile_fn)
        self._ddp: nn.parallel.DistributedDataParallel | None = None
        self._wrapped: list[int] = []  # the trainable parameters the wrapper was built for
        self._forward: nn.Module | None = None
        self._stop_vote: str | None = None  # a stop this rank asked for, not yet agreed with the others

    def join(self, config: RunConfig, pm: pluggy.PluginManager) -> None:
        distributed.check_config(config)
        if self.rank > 0:
            for plugin in [p for p in pm.get_plugins() if distributed.is_rank_zero_only(p)]:
                pm.unregister(plugin)
        # Same initial weights everywhere (built before this), distinct random streams per rank.
        seed_everything(distributed.rank_seed(config.seed, self.rank))

    def prepare(self, model: nn.Module, forward: nn.Module) -> nn.Module:
        trainable = [id(p) for p in model.parameters() if p.requires_grad]
        if self._forward is None or trainable != self._wrapped:  # first use, or a plugin (un)froze parameters
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
            self._forward = self.compile_fn(self._ddp) if self.compile_fn is not None else self._ddp
            self._wrapped = trainable
        return self._forward

    def gradient_sync(self, accumulate: int) -> Callable[[bool], None] | None:
        # While gradients accumulate the ranks need not average them: only the batch that steps
        # all-reduces (what DistributedDataParallel.no_sync does, decided before each forward pass).
        if self._ddp is None or accumulate == 1:
            return None
        wrapper = self._ddp

        def switch(sync: bool) -> None:
            wrapper.require_backward_grad_sync = sync

        return switch

    def average_gradients(self, model: nn.Module) -> None:
        distributed.average_gradients(model.parameters())

    def request_stop(self, state: TrainState, reason: str) -> None:
        # Every rank must stop at the same step: the vote is counted at the next agreement.
        self._stop_vote = self._stop_vote or reason

    def agree(self, state: TrainState, *sums: float) -> list[float]:
        values = torch.tensor([*sums, self._stop_vote is not None], dtype=torch.float64, device=self.device)
        values = distributed.all_reduce(values).tolist()
        if values[-1]:
            reasons = distributed.all_gather_object(self._stop_vote)
            first = next(r for r, reason in enumerate(reasons) if reason is not None)
            state.should_stop = True
            state.stop_reason = reasons[first] if first == 0 else f"{reasons[first]} (on rank {first})"
            self._stop_vote = None
        return values[:-1]

    def share_buffers(self, model: nn.Module) -> None:
        distributed.broadcast_buffers(model)

    def share_object(self, obj: Any) -> Any:
        return distributed.broadcast_object(obj)

    def barrier(self) -> None:
        distributed.barrier()

    def gather(self, state: dict[str, object]) -> list[dict[str, object]]:
        return distributed.all_gather_state(state)

    def teardown(self) -> None:
        # Every rank done before any leaves, and DDP's wrapper gone before the process
        # group: torn down in the other order, gloo can abort a rank at exit.
        self.barrier()
        self._ddp = self._forward = None


def make_strategy(device: torch.device, compile_fn: Callable[[nn.Module], nn.Module] | None = None) -> Strategy:
    """DDP when this process is one rank of a distributed run, else one process."""
    return (DDP if distributed.is_initialized() else Strategy)(device, compile_fn)
