"""Sharded training with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``):
each rank holds a part of every parameter, gradient and optimizer state, and a
block's whole parameters exist only while that block runs.

The model is sharded in place when the trainer is built, so plugins see its
final parameters from ``on_setup`` on (sharded ``DTensor`` s, under the same
names).  Checkpoints write each rank's part through ``torch.distributed.checkpoint``
(:mod:`trainer_core.sharded`), which reads them back in any number of processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from trainer_core.errors import UsageError
from trainer_core.sharded import new_token, own_digests, read_shards, unseen_shards, write_shards
from trainer_core.stepping import PRECISIONS
from trainer_core.strategy import Ranks

if TYPE_CHECKING:
    import pluggy

    from trainer_core.config import RunConfig

#: A model names the submodules to shard one by one with this attribute (an
#: iterable of its submodules, e.g. its transformer blocks); without it, each
#: top-level child with parameters is one.
SHARD_BLOCKS = "shard_blocks"


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks of ``model`` that are sharded (and gathered) one at a time: those it
    names, else its top-level children (the members of a ``ModuleList`` or ``ModuleDict``,
    which have no forward pass of their own).

    Children that share a parameter with another child (a language model's head
    tied to its embedding) stay with the root: a parameter belongs to one unit."""
    named = getattr(model, SHARD_BLOCKS, None)
    if named is not None:
        return list(named)
    children: list[nn.Module] = []
    for child in model.children():
        children += list(child.children()) if isinstance(child, (nn.ModuleList, nn.ModuleDict)) else [child]
    children = [child for child in children if any(True for _ in child.parameters())]
    owners: dict[int, int] = {}
    for child in children:
        for parameter in child.parameters():
            owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    return [child for child in children if all(owners[id(p)] == 1 for p in child.parameters())]


def shard(model: nn.Module, device: torch.device, world_size: int, precision: str) -> None:
    """Shard ``model`` in place over ``world_size`` ranks: its blocks, then the root
    (the parameters no block holds).  Under bf16 the whole parameters are
    gathered and computed in that type; gradients are reduced in fp32."""
    mesh = init_device_mesh(device.type, (world_size,))
    dtype = PRECISIONS[precision]
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


class FSDP(Ranks):
    """Several processes, each holding a shard of the model (FSDP2).

    Forward passes are collectives (every rank gathers each block's parameters),
    so evaluation takes the same number of steps on every rank, and plugins read
    a whole parameter with ``trainer.full_tensor``."""

    name = "fsdp"
    shards_parameters = True

    def __init__(self, device: torch.device, compile_fn: Callable[[nn.Module], nn.Module] | None = None) -> None:
        super().__init__(device, compile_fn)
        self._model: nn.Module | None = None
        self._defer_sync = True

    def join(self, config: RunConfig, pm: pluggy.PluginManager, model: nn.Module) -> None:
        super().join(config, pm, model)
        # A batch skipped for a non-finite loss must not be the one that was to reduce the
        # accumulated gradients: with skipping on, every batch reduces its own.
        self._defer_sync = config.nonfinite != "skip"
        shard(model, self.device, self.world_size, config.precision)
        self._model = model

    def gradient_sync(self, accumulate: int) -> Callable[[bool], None] | None:
        if accumulate == 1 or not self._defer_sync:
            return None
        assert self._model is not None, "gradient_sync before join"
        return self._model.set_requires_gradient_sync  # type: ignore[no-any-return]

    def local_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor

    def full_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

    def share_weights(self, model: nn.Module) -> None:
        # Each rank holds other parts of each parameter: rank zero's cannot stand for the others'.
        raise NotImplementedError("a sharded model is loaded by every rank together: use load_whole_weights or read_shards")

    def load_whole_weights(self, model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
        set_model_state_dict(model, dict(weights), options=StateDictOptions(full_state_dict=True))

    def write_shards(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, path: Path) -> dict[str, Any] | None:
        token = self.share_object(new_token())
        state = {"model": get_model_state_dict(model)}
        if optimizer is not None:
            state["optimizer"] = get_optimizer_state_dict(model, optimizer)
        write_shards(path, token, state)
        digests: dict[str, str] = {}
        for part in self.gather({"digests": own_digests(path, token, self.rank)}):
            digests.update(part["digests"])  # type: ignore[arg-type]
        unseen = self.share_object(unseen_shards(path, token, digests) if self.rank == 0 else None)
        if unseen:
            raise UsageError(unseen)
        return {"shards": token, "shard_digests": digests}

    def read_shards(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, folder: Path) -> None:
        if optimizer is None:
            state = {"model": get_model_state_dict(model)}
            read_shards(folder, state)
            set_model_state_dict(model, state["model"])
        else:
            state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
            read_shards(folder, state)
            set_optimizer_state_dict(model, optimizer, state["optimizer"])

