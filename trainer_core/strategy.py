"""How a run spreads over processes: the one object the loop calls for anything
that crosses ranks.

:class:`Strategy` is one process, where every call is the identity or nothing;
:class:`DDP` trains in several processes through PyTorch's
``DistributedDataParallel``, and :class:`~trainer_core.fsdp.FSDP` shards the
model over them (``fully_shard``).  The loop reads the same with any of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

from trainer_core import distributed
from trainer_core.errors import UsageError
from trainer_core.runtime import seed_everything

if TYPE_CHECKING:
    import pluggy

    from trainer_core.config import RunConfig
    from trainer_core.state import TrainState


class Strategy:
    """One process: nothing to wrap, reduce or agree on."""

    name = "single"
    distributed = False
    #: Whether parameters are sharded over the ranks (each holds a part of each):
    #: then reading a whole parameter is a collective (:meth:`full_tensor`), and so is every forward pass.
    shards_parameters = False

    def __init__(self, device: torch.device, compile_fn: Callable[[nn.Module], nn.Module] | None = None) -> None:
        """:param device: this process's device.
        :param compile_fn: what ``--compile`` applies to the module training calls."""
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.device = device
        self.compile_fn = compile_fn

    def join(self, config: RunConfig, pm: pluggy.PluginManager, model: nn.Module) -> None:
        """Checks and settings of this process, when the trainer is built (``model`` is on its device)."""

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

    def share_weights(self, model: nn.Module) -> None:
        """Give every rank rank zero's weights (after rank zero alone loaded them)."""

    def local_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of a parameter (or of its gradient): the whole of it unless sharded."""
        return tensor

    def full_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """The whole of a parameter (or of its gradient); gathered from every rank when
        sharded, so then every rank must call it."""
        return tensor

    def load_whole_weights(self, model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
        """Load a whole-tensor state dict into ``model`` (sharding it, where the model is sharded)."""
        model.load_state_dict(weights)

    def write_shards(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, path: Path) -> dict[str, Any] | None:
        """Write the weights and optimizer state as shards for checkpoint ``path``
        (every rank calls it) and return what the checkpoint file records of them
        (their folder's token and digests); ``None``: they belong in the file itself."""
        return None

    def read_shards(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, folder: Path) -> None:
        """Load the weights (``optimizer`` ``None``) or the optimizer state from the shards in
        ``folder``: only a strategy whose :meth:`write_shards` writes them has any to read."""
        raise NotImplementedError(f"{type(self).__name__} keeps whole weights in the checkpoint file")

    def teardown(self) -> None:
        """Release what wraps the model (before the process group ends)."""


class Ranks(Strategy):
    """What every strategy of several processes shares: one rank each, plugins
    that run on rank zero only, stops agreed by all, state gathered and shared."""

    distributed = True

    def __init__(self, device: torch.device, compile_fn: Callable[[nn.Module], nn.Module] | None = None) -> None:
        super().__init__(device, compile_fn)
        self._stop_vote: str | None = None  # a stop this rank asked for, not yet agreed with the others

    def join(self, config: RunConfig, pm: pluggy.PluginManager, model: nn.Module) -> None:
        distributed.check_config(config)
        if self.rank > 0:
            for plugin in [p for p in pm.get_plugins() if distributed.is_rank_zero_only(p)]:
                pm.unregister(plugin)
        # Same initial weights everywhere (built before this), distinct random streams per rank.
        seed_everything(distributed.rank_seed(config.seed, self.rank))

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
        distributed.broadcast_tensors(model.buffers())

    def share_object(self, obj: Any) -> Any:
        return distributed.broadcast_object(obj)

    def barrier(self) -> None:
        distributed.barrier()

    def gather(self, state: dict[str, object]) -> list[dict[str, object]]:
        return distributed.all_gather_state(state)

    def share_weights(self, model: nn.Module) -> None:
        distributed.broadcast_tensors(model.state_dict().values())

    def teardown(self) -> None:
        # Every rank done before any leaves (gloo can abort a rank left at exit).
        self.barrier()


class DDP(Ranks):
    """Several processes with ``DistributedDataParallel``, which averages
    gradients during ``backward``.  The model stays the plain module for plugins
    and checkpoints, so parameter names are the same in any world size."""

    name = "ddp"

    def __init__(self, device: torch.device, compile_fn: Callable[[nn.Module], nn.Module] | None = None) -> None:
        super().__init__(device, compile_fn)
        self._ddp: nn.parallel.DistributedDataParallel | None = None
        self._wrapped: list[int] = []  # the trainable parameters the wrapper was built for
        self._forward: nn.Module | None = None

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

    def teardown(self) -> None:
        # DDP's wrapper gone before the process group: torn down in the other order, gloo can abort a rank at exit.
        super().teardown()
        self._ddp = self._forward = None


def check_strategy(config: RunConfig, launching: bool = False) -> None:
    """Refuse a strategy the run cannot use, before anything is built: in this process, or
    (``launching``) in the processes a launcher is about to start."""
    if config.strategy != "fsdp":
        return
    if not launching and not distributed.is_initialized():
        raise UsageError("--strategy fsdp shards the model over several processes: add --nproc-per-node N")
    if config.precision == "16":
        # (Whether every rank skips the same steps when one shard's fp16 gradients overflow is not checked here.)
        raise UsageError("--strategy fsdp trains in 32-bit or bf16, not fp16 (no gradient scaling of sharded "
                         "gradients here): use --precision bf16")


def make_strategy(config: RunConfig, device: torch.device, compile_fn: Callable[[nn.Module], nn.Module] | None = None) -> Strategy:
    """The strategy of ``config.strategy`` for this process: ``auto`` is DDP when
    this process is one rank of a distributed run, and one process otherwise."""
    check_strategy(config)
    if not distributed.is_initialized():
        return Strategy(device, compile_fn)
    if config.strategy == "fsdp":
        from trainer_core.fsdp import FSDP

        return FSDP(device, compile_fn)
    return DDP(device, compile_fn)
