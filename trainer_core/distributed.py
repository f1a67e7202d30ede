"""Training in several processes with PyTorch's own distributed engine.

torchrun (``torch.distributed.run``) starts one process per device and tells
each its place through environment variables (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).  This module turns those
into a process group (gloo on CPU, NCCL on CUDA), answers "which rank am I",
splits data between ranks and reduces metrics across them (starting torchrun
is :mod:`trainer_core.launcher`'s).  Every collective here is the identity
when no process group is initialised, so single-process code calls them freely.

Importing this module does not import torch (plugins import
:func:`rank_zero_only` from it at their own import time).
"""

from __future__ import annotations

import atexit
import datetime
import gc
import os
from typing import TYPE_CHECKING, Any, Iterable, Literal, TypeVar

from trainer_core.errors import UsageError

if TYPE_CHECKING:
    import torch

    from trainer_core.config import RunConfig

BACKENDS = ("gloo", "nccl")
BACKEND_ENV = "TRAINER_BACKEND"
TIMEOUT_ENV = "TRAINER_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0  # a rank left alone in a collective gives up after this long
RANK_ZERO_ONLY = "rank_zero_only"

ReduceOp = Literal["sum", "max", "min"]
P = TypeVar("P")


# -- the rank-zero-only marker --------------------------------------------------


def rank_zero_only(plugin_class: type[P]) -> type[P]:
    """Class decorator: the plugin runs on rank zero only.

    Under torch.distributed the core does not register such a plugin on the
    other ranks, so none of its hooks run there.  Use it for plugins whose
    only effects are on the outside world (files, consoles, web services).
    Setting the class attribute ``rank_zero_only = True`` is the same.  A
    plugin that takes part in collectives (``trainer.all_reduce``) or computes
    metrics from validation batches must run on every rank instead.
    """
    setattr(plugin_class, RANK_ZERO_ONLY, True)
    return plugin_class


def is_rank_zero_only(plugin: object) -> bool:
    """Whether ``plugin`` (or its class) declared itself rank-zero-only."""
    return getattr(plugin, RANK_ZERO_ONLY, False) is True


# -- the process group --------------------------------------------------------


def launched_by_torchrun() -> bool:
    """True in a process started by torchrun (or any launcher that sets ``RANK`` and ``WORLD_SIZE``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_initialized() -> bool:
    """Whether a process group is up: this process is one rank of a distributed run."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    import torch.distributed as dist

    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """How many processes take part (1 without a process group)."""
    import torch.distributed as dist

    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """This process's index on its machine, which picks its CUDA device."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def choose_backend(device: torch.device, requested: str | None = None) -> str:
    """``requested``, else ``$TRAINER_BACKEND``, else NCCL for CUDA and gloo otherwise."""
    import torch.distributed as dist

    backend = requested or os.environ.get(BACKEND_ENV) or ("nccl" if device.type == "cuda" else "gloo")
    if backend not in BACKENDS:
        raise UsageError(f"backend '{backend}' is not supported; use one of {', '.join(BACKENDS)}")
    if backend == "nccl" and (device.type != "cuda" or not dist.is_nccl_available()):
        raise UsageError(f"backend nccl needs CUDA devices (this run's device is {device}); use --backend gloo")
    if backend == "gloo" and not dist.is_gloo_available():
        raise UsageError("backend gloo is not built into this torch; use --backend nccl on CUDA")
    return backend


def device_for_rank(device: torch.device) -> torch.device:
    """A process of a distributed run uses the CUDA device of its local rank
    (``cuda`` becomes ``cuda:LOCAL_RANK``); other devices are kept."""
    import torch

    if device.type != "cuda" or not launched_by_torchrun():
        return device
    if device.index is None:
        device = torch.device("cuda", local_rank())
    if device.index >= torch.cuda.device_count():
        raise UsageError(
            f"local rank {local_rank()} needs {device} but this machine has {torch.cuda.device_count()} CUDA device(s); "
            "start at most one process per GPU (--nproc-per-node)"
        )
    torch.cuda.set_device(device)
    return device


def collective_timeout() -> datetime.timedelta:
    """How long a collective waits for the other ranks (``$TRAINER_DIST_TIMEOUT`` seconds)."""
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise UsageError(f"{TIMEOUT_ENV} must be a number of seconds > 0 (got {text!r})")
    return datetime.timedelta(seconds=seconds)


def init_from_env(device: torch.device, backend: str | None = None) -> bool:
    """Join the process group torchrun's environment describes.

    Does nothing (and returns ``False``) when a group is already up or the
    process was not started by torchrun.  Otherwise initialises it (the
    backend from :func:`choose_backend`) and returns ``True``: the caller owns
    the group and ends it with :func:`shutdown`.
    """
    import torch.distributed as dist

    if is_initialized() or not launched_by_torchrun():
        return False
    if not dist.is_available():
        raise UsageError("this torch build has no torch.distributed; install a build with it to run several processes")
    chosen = choose_backend(device, backend)
    try:
        dist.init_process_group(chosen, timeout=collective_timeout())
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"cannot join the distributed run ({chosen}): {str(exc).strip().splitlines()[0]}") from None
    return True


def init_for_library(device: torch.device) -> torch.device:
    """For code that builds a :class:`~trainer_core.Trainer` itself under torchrun:
    join the process group if nobody has (it is ended at exit) and return the
    device of this rank."""
    device = device_for_rank(device)
    if init_from_env(device):
        atexit.register(shutdown)
    return device


def shutdown() -> None:
    """Leave and destroy the process group, if one is up."""
    import torch.distributed as dist

    if is_initialized():
        # Objects in reference cycles that hold collective work (a trainer and its strategy) freed now, while the
        # interpreter can still run their destructors: freed during its exit, gloo's threads abort the process.
        gc.collect()
        dist.destroy_process_group()


# -- collectives (identity in one process) ------------------------------------


def barrier() -> None:
    """Wait until every rank gets here."""
    import torch.distributed as dist

    if is_initialized():
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
    """Combine ``tensor`` across ranks in place (``sum``, ``max`` or ``min``) and return it.

    To average, sum numerators and denominators and divide afterwards, so an
    uneven split between ranks weighs every sample once.
    """
    import torch.distributed as dist

    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"all_reduce op must be one of {', '.join(ops)} (got {op!r})")
    if is_initialized():
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Give every rank rank ``src``'s values of ``tensors``, in place."""
    import torch.distributed as dist

    if is_initialized():
        for tensor in tensors:
            dist.broadcast(tensor, src)


def broadcast_object(obj: P, src: int = 0) -> P:
    """Rank ``src``'s ``obj`` on every rank (picklable objects)."""
    import torch.distributed as dist

    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: P) -> list[P]:
    """Every rank's ``obj``, in rank order."""
    import torch.distributed as dist

    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_state(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ``state``, tensors included, in rank order."""
    import io

    import torch

    # As torch.save bytes: gathered as objects, the tensors in them fail to arrive (torch 2.14, gloo).
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return [torch.load(io.BytesIO(data), weights_only=True) for data in all_gather_object(buffer.getvalue())]


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients over the ranks, as DistributedDataParallel's backward does."""
    size = world_size()
    for parameter in parameters:
        if parameter.grad is not None:
            all_reduce(parameter.grad).div_(size)


# -- splitting data between ranks ---------------------------------------------


def check_config(config: RunConfig, size: int | None = None) -> None:
    """Refuse settings a run of ``size`` processes (default: this run's) cannot
    honour: a global batch that does not split evenly over the ranks (each
    takes the same share of every step)."""
    size = world_size() if size is None else size
    if size == 1:
        return
    if config.batch_size % size:
        raise UsageError(
            f"batch size {config.batch_size} is the global batch and must split evenly over {size} processes; "
            f"use a multiple of {size}"
        )


def shard_bounds(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of ``rank``'s part when ``size`` items are cut into
    ``world_size`` contiguous parts whose sizes differ by at most one (the
    first ``size % world_size`` parts are the longer ones).  Parts never
    overlap and together cover every item once; a part may be empty."""
    base, extra = divmod(size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of ``rank``'s random streams (dropout, augmentation): distinct
    per rank, a function of the run's seed and the rank only."""
    return seed + 1_000_003 * rank
