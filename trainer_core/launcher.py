"""Starting a run in several processes: ``trainer run --nproc-per-node N`` runs
torchrun (``torch.distributed.run``) in its own process, as the elastic agent
of the workers, and reports a failed worker or rendezvous in one line.  The
workers' side: stopping with their launcher, and the error each leaves for it.

Importing this module does not import torch.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any, Sequence

from trainer_core.distributed import launched_by_torchrun
from trainer_core.errors import TrainerError, UsageError

DEFAULT_RDZV_TIMEOUT_S = 600  # the processes of every node must meet within this long (torchrun's default)
LAUNCHER_PID_ENV = "TRAINER_LAUNCHER_PID"  # set for the processes `trainer run --nproc-per-node` starts


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
