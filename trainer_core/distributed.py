"""Training in several processes with PyTorch's own distributed engine.

torchrun (``torch.distributed.run``) starts one process per device and tells
each its place through environment variables (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).  This module turns those
into a process group (gloo on CPU, NCCL on CUDA), answers "which rank am I",
splits data between ranks, reduces metrics across them, and starts torchrun
for ``trainer run --nproc-per-node N``.  Every collective here is the identity
when no process group is initialised, so single-process code calls them freely.

Importing this module does not import torch (plugins import
:func:`rank_zero_only` from it at their own import time).
"""

from __future__ import annotations

import atexit
import datetime
import gc
import json
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Iterable, Literal, Sequence, TypeVar

from trainer_core.errors import TrainerError, UsageError

if TYPE_CHECKING:
    import torch

    from trainer_core.config import RunConfig

BACKENDS = ("gloo", "nccl")
BACKEND_ENV = "TRAINER_BACKEND"
TIMEOUT_ENV = "TRAINER_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0  # a rank left alone in a collective gives up after this long
DEFAULT_RDZV_TIMEOUT_S = 600  # the processes of every node must meet within this long (torchrun's default)
LAUNCHER_PID_ENV = "TRAINER_LAUNCHER_PID"  # set for the processes `trainer run --nproc-per-node` starts
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


# -- launching ----------------------------------------------------------------


def torchrun_args(
    nproc_per_node: int,
    worker_args: Sequence[str],
    *,
    nnodes: int = 1,
    node_rank: int | None = None,
    rdzv_endpoint: str | None = None,
    rdzv_timeout: int = DEFAULT_RDZV_TIMEOUT_S,
) -> list[str]:
    """The ``torch.distributed.run`` command line that starts ``python -m
    trainer_core <worker_args>`` in ``nproc_per_node`` processes per node
    (with ``-P`` from Python 3.11: nothing is imported from the working directory).

    One node uses a local rendezvous on a free port.  Several nodes meet at
    ``rdzv_endpoint`` (``HOST:PORT`` of a machine every node reaches): with
    ``node_rank`` the ranks are fixed (torchrun's static rendezvous, node 0
    serves the endpoint); without it torchrun's c10d rendezvous assigns them.
    Either gives up after ``rdzv_timeout`` seconds (the static rendezvous's
    ``timeout``, the c10d one's ``join_timeout``).
    """
    if nproc_per_node < 1:
        raise UsageError(f"--nproc-per-node must be >= 1 (got {nproc_per_node})")
    if nnodes < 1:
        raise UsageError(f"--nnodes must be >= 1 (got {nnodes})")
    if node_rank is not None and not 0 <= node_rank < nnodes:
        raise UsageError(f"--node-rank must be in [0, {nnodes - 1}] for --nnodes {nnodes} (got {node_rank})")
    if nnodes > 1 and not rdzv_endpoint:
        raise UsageError("a run on several nodes needs --rdzv-endpoint HOST:PORT (an address of node 0 every node reaches)")
    if rdzv_endpoint is not None and not _is_endpoint(rdzv_endpoint):
        raise UsageError(f"--rdzv-endpoint must be HOST:PORT (got {rdzv_endpoint!r})")
    if isinstance(rdzv_timeout, bool) or not isinstance(rdzv_timeout, int) or rdzv_timeout < 1:
        raise UsageError(f"--rdzv-timeout must be a whole number of seconds >= 1 (got {rdzv_timeout!r})")
    args = ["--nproc-per-node", str(nproc_per_node), "--nnodes", str(nnodes)]
    if node_rank is not None:
        args += ["--node-rank", str(node_rank)]
    if rdzv_endpoint:
        args += ["--rdzv-endpoint", rdzv_endpoint]
        if node_rank is None:
            args += ["--rdzv-backend", "c10d", "--rdzv-id", "trainer"]
        # (One node without an endpoint meets on a port the system picks, at once: nothing to wait for.)
        args += ["--rdzv-conf", f"{'timeout' if node_rank is not None else 'join_timeout'}={rdzv_timeout}"]
    if sys.version_info >= (3, 11):
        # ``python -m`` puts the working directory first on sys.path; -P leaves it out.
        return [*args, "--no-python", sys.executable, "-P", "-u", "-m", "trainer_core", *worker_args]
    return [*args, "-m", "trainer_core", *worker_args]


def _is_endpoint(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def check_worker_options(launcher: dict[str, Any], backend: str | None) -> None:
    """Refuse launcher options given without ``--nproc-per-node``, and a
    backend for a run that is not distributed."""
    given = [f"--{name.replace('_', '-')}" for name, value in launcher.items() if value is not None]
    if given:
        raise UsageError(f"{', '.join(given)} only make sense with --nproc-per-node N")
    if backend is not None and not launched_by_torchrun():
        raise UsageError("--backend is for a run in several processes: add --nproc-per-node N (or start it with torchrun)")


def worker_label() -> str:
    """``"rank R: "`` in one process of a run with several, else nothing."""
    if launched_by_torchrun() and os.environ.get("WORLD_SIZE", "1") != "1":
        return f"rank {os.environ['RANK']}: "
    return ""


def launch(args: Sequence[str], rdzv_timeout: int = DEFAULT_RDZV_TIMEOUT_S) -> None:
    """Run ``torch.distributed.run`` with ``args`` (from :func:`torchrun_args`)
    in this process, as the elastic agent of the workers.

    When a worker fails, torchrun stops the others; this raises a
    :class:`TrainerError` naming the rank that failed first with its own error
    message, and exiting with that rank's exit status.  A SIGINT or SIGTERM
    (which the workers receive as well, and stop on) exits with 128 + its number.
    A rendezvous that fails, or does not happen within ``rdzv_timeout`` seconds
    (the value given to :func:`torchrun_args`), ends it in one line too.
    """
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import parse_args, run

    if launched_by_torchrun():
        raise UsageError("this process was already started by torchrun; drop --nproc-per-node (torchrun's options decide)")
    parsed = parse_args(list(args))
    endpoint = parsed.rdzv_endpoint or None
    # torchrun would give each process one thread (and warn); share the cores out instead.
    saved = {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", LAUNCHER_PID_ENV)}
    if saved["OMP_NUM_THREADS"] is None:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(parsed.nproc_per_node)))
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # the processes stop if this one dies (stop_with_launcher)
    watch = RendezvousWatch(endpoint, rdzv_timeout)
    try:
        run(parsed)
    except ChildFailedError as exc:
        raise worker_failure(exc) from None
    except SignalException as exc:
        # Ctrl-C or a scheduler's SIGTERM: the processes got it too and stopped
        # together (rank zero said so); exit as a process ended by it does.
        raise SystemExit(128 + int(exc.sigval)) from None
    except (RendezvousError, DistError) as exc:  # (a store on an occupied port, a node that never came...)
        raise TrainerError(rendezvous_failure(endpoint, rdzv_timeout, exc, met=watch.met)) from None
    finally:
        watch.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


RDZV_GRACE_S = 3  # torch's own rendezvous timeout reports first where it works


def rendezvous_failure(endpoint: str | None, timeout: int, exc: BaseException | None = None, met: bool | None = False) -> str:
    """The one-line error of a rendezvous that failed with ``exc`` (``None``: did not happen in time)."""
    where = f" at {endpoint}" if endpoint else ""
    reason = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else ""
    if met:
        return f"the processes lost their rendezvous{where}: {reason or type(exc).__name__}"
    if exc is None or "timed out" in reason.lower() or "Timeout" in type(exc).__name__:
        detail = f": {reason}" if reason else ""
        hint = " (is another program listening on that port? are all --nnodes machines started?)" if endpoint else ""
        return f"the processes did not meet{where} within {timeout} s{detail}{hint}; --rdzv-timeout sets the wait"
    if "EADDRINUSE" in reason or "address already in use" in reason.lower():
        return f"the rendezvous{where} failed: another program already listens on that port; choose a free one ({reason})"
    return f"the rendezvous{where} failed: {reason or type(exc).__name__}"


class RendezvousWatch:
    """Exits this process in one line (status 1) if it has started no process
    ``timeout`` seconds (and a grace) after this object was made, until :meth:`stop`.

    torch's own timeouts do not cover every wait: its store client waits forever
    for the answer of a program that accepts connections on the endpoint's port
    and never replies, inside a call no exception or signal handler interrupts.
    Where ``/proc`` cannot tell whether processes started, this watches nothing.
    """

    def __init__(self, endpoint: str | None, timeout: int) -> None:
        self.endpoint, self.timeout = endpoint, timeout
        self.met: bool | None = None  # whether torchrun started the processes (None: cannot tell)
        self._done = threading.Event()
        self._deadline = time.monotonic() + timeout + RDZV_GRACE_S
        if _has_child(os.getpid()) is False:  # (no /proc, or children already: a library caller's)
            self.met = False
            threading.Thread(target=self._watch, name="trainer-rendezvous-watch", daemon=True).start()

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(0.25):
            if _has_child(os.getpid()):
                self.met = True  # the rendezvous happened and torchrun started the processes
                return
            if time.monotonic() >= self._deadline:
                sys.stderr.write(f"error: {rendezvous_failure(self.endpoint, self.timeout)}\n")
                sys.stderr.flush()
                os._exit(1)  # the main thread waits in torch's C++ code, which nothing else interrupts


def _has_child(pid: int) -> bool | None:
    """Whether process ``pid`` has a child (``None`` without ``/proc``)."""
    try:  # Linux lists each thread's children (where the kernel has CONFIG_PROC_CHILDREN)...
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as handle:
                if handle.read().strip():
                    return True
        return False
    except OSError:
        pass
    try:  # ...else find a process whose parent it is
        entries = os.scandir("/proc")
    except OSError:
        return None
    with entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as handle:
                    if int(handle.read().rsplit(b")", 1)[1].split()[1]) == pid:
                        return True
            except (OSError, IndexError, ValueError):
                continue
    return False


def stop_with_launcher() -> None:
    """In a process torchrun started: stop as on SIGTERM (finish the step, save,
    exit) when the launcher, its parent, dies, even of SIGKILL, instead of
    training on as an orphan.  A daemon thread compares the parent's process id
    once a second; ``trainer run --nproc-per-node`` names its own id in
    ``$TRAINER_LAUNCHER_PID``, so a launcher gone before this call counts too."""
    import signal

    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    parent, launcher = os.getppid(), os.environ.get(LAUNCHER_PID_ENV, "")
    if launcher.isdigit() and int(launcher) != parent:
        try:
            os.kill(int(launcher), 0)  # alive: not our launcher (an inherited variable), the parent is
        except ProcessLookupError:
            parent = -1  # our launcher died before this process got here: stop at once
        except OSError:
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="trainer-launcher-watch", daemon=True).start()


def worker_failure(exc: Any) -> TrainerError:
    """The error to report for torchrun's ``ChildFailedError``: the first
    failure that is not merely a rank losing contact with a failed peer."""
    failures = list(exc.failures.items())

    def order(item: tuple[int, Any]) -> tuple[int, int, int]:
        rank_, failure = item
        data = failure.error_file_data if isinstance(failure.error_file_data, dict) else {}
        # Our own record of an error first, then a death without one (a signal,
        # a crash), and last a rank that only lost contact with a failed peer.
        kind = 1 if "secondary" not in data else 2 if data["secondary"] else 0
        return (kind, failure.timestamp, rank_)

    rank_, failure = min(failures, key=order)
    code = failure.exitcode if failure.exitcode > 0 else 1
    message = failure.message if isinstance(failure.message, str) else json.dumps(failure.message)
    if failure.exitcode < 0:
        message = f"killed by {failure.signal_name()}"
    error = TrainerError(f"process rank {rank_} failed (exit status {failure.exitcode}): {message}")
    error.exit_code = code
    return error


def record_error(message: str, exc: BaseException) -> None:
    """Leave ``message`` for torchrun (in ``$TORCHELASTIC_ERROR_FILE``), which
    reports it as this rank's failure; marks errors that only say another rank
    went away as secondary, so the launcher points at the rank that failed first."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or not launched_by_torchrun():
        return
    record = {"message": message, "timestamp": int(time.time()), "secondary": lost_peer(exc)}
    try:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
    except OSError:
        pass  # the error is still printed; the file only improves torchrun's summary


def worker_message(message: str, exc: BaseException) -> str:
    """``message``, prefixed in a process that failed only because another
    process of the run went away, so the reader looks for that one's error."""
    if launched_by_torchrun() and lost_peer(exc):
        return f"another process of the run went away (its own error says why): {message}"
    return message


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a collective failing because another rank is gone."""
    import torch.distributed as dist

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, getattr(dist, "DistError", ())):
            return True
        text = str(seen)
        if isinstance(seen, RuntimeError) and ("Connection closed by peer" in text or "Connection reset by peer" in text):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
