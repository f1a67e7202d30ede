"""The processes of a sweep: ``--jobs`` worker processes, what a trial records of
the process that runs it, and the trials whose process is gone (a killed sweep),
failed and queued again when the sweep starts again."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from trainer_core.errors import TrainerError

if TYPE_CHECKING:
    import optuna

    from trainer_core.sweep import SweepSpec


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), so that a
    recycled process id is not taken for the process that ran a trial."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: Any, started: Any) -> bool:
    if not isinstance(pid, int):
        return False
    if Path("/proc/self/stat").exists():
        return _start_time(pid) == started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


def this_process() -> dict[str, Any]:
    """What a trial records of the process that runs it."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": _start_time(os.getpid())}


def fail_stale_trials(study: optuna.Study) -> list[int]:
    """Trials left running by a process of this machine that no longer lives (a killed
    sweep): mark them failed and queue their values again, so a resumed sweep neither
    loses nor counts them.  Called once per ``trainer sweep`` before its processes start
    (trials of other machines are theirs to fail when they start again).  Returns their numbers."""
    from optuna.trial import TrialState

    host, failed = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if attrs.get("host") == host and not _alive(attrs.get("pid"), attrs.get("pid_started")):
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            failed.append(trial.number)
    return failed


# -- several processes ----------------------------------------------------------

def _worker_main(spec: SweepSpec, worker: int, threads: int) -> None:
    """One of ``--jobs`` processes: its share of the cores, and it stops (as on
    SIGTERM: the trial is marked failed and queued again) when the sweep's process dies."""
    import signal
    import sys
    import threading

    import torch

    torch.set_num_threads(threads)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="trainer-sweep-watch", daemon=True).start()
    from trainer_core.sweep import work

    try:
        sys.exit(work(spec, worker=worker))
    except TrainerError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)


def run_jobs(spec: SweepSpec, jobs: int) -> int:
    """Run ``jobs`` worker processes (not threads: each trains with its own share of the
    cores) and wait for them; return the first non-zero exit status, or 0."""
    import multiprocessing

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    context = multiprocessing.get_context("spawn")  # (a fork would copy torch's threads and locks mid-state)
    processes = [context.Process(target=_worker_main, args=(spec, index, max(1, cores // jobs)), name=f"sweep-{index}")
                 for index in range(jobs)]
    # A spawned child starts as `python -c ...`, which puts the working directory first on sys.path
    # until multiprocessing resets it: safe path (Python 3.11+) keeps its modules from standing in for ours.
    saved = os.environ.get("PYTHONSAFEPATH")
    os.environ["PYTHONSAFEPATH"] = "1"
    try:
        for process in processes:
            process.start()
    finally:
        if saved is None:
            os.environ.pop("PYTHONSAFEPATH", None)
        else:
            os.environ["PYTHONSAFEPATH"] = saved
    while True:
        try:
            for process in processes:
                process.join()
            break
        except KeyboardInterrupt:  # the workers got it too, and stop after their step
            continue
    codes = [p.exitcode or 0 for p in processes]
    return next((c if c > 0 else 128 - c for c in codes if c), 0)


