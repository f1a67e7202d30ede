"""The launcher of ``trainer run --nproc-per-node N`` under faults (issue 14).

Real processes throughout: a rendezvous endpoint held by a program that never
answers, a launcher killed with SIGKILL while its processes train, and a
working directory holding modules named like ours.  Every process a test starts
runs in a session of its own and is killed, with every process it started, when
the test ends, so nothing hangs or outlives it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from trainer_core.launcher import torchrun_args
from trainer_core.errors import UsageError

TIMEOUT_S = 120  # a run that hangs fails the test instead of blocking CI
TRAINER = [str(Path(sys.executable).with_name("trainer"))]  # the console script
JOB = ["--dataset", "fake", "-o", "dataset.train_size=32", "-o", "dataset.val_size=8", "-o", "model.width=4",
       "--batch-size", "8", "--log-every", "1", "--num-workers", "0", "-q"]


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRAINER_DEBUG", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


# -- processes --------------------------------------------------------------------


def parents() -> dict[int, int]:
    found = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            found[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return found


def descendants(pid: int) -> list[int]:
    """``pid``'s children, grandchildren...: torchrun starts each process in a session of its own."""
    table, found, frontier = parents(), [], [pid]
    while frontier:
        frontier = [child for child, parent in table.items() if parent in frontier]
        found += frontier
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts (in new sessions); killed with everything they started at the end."""
    procs: list[subprocess.Popen[str]] = []
    extra: list[int] = []
    try:
        yield procs
    finally:
        for proc in procs:
            extra += descendants(proc.pid)
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        kill(extra)
        for proc in procs:
            proc.communicate()


def start(procs: list[subprocess.Popen[str]], args: list[str], cwd: Path, **kwargs: object) -> subprocess.Popen[str]:
    proc = subprocess.Popen(args, cwd=cwd, env=environment(), text=True, start_new_session=True,
                            **kwargs)  # type: ignore[call-overload]
    procs.append(proc)
    return proc


def finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(proc.args)} still ran after {TIMEOUT_S} s")  # type: ignore[arg-type]


# -- 9: the rendezvous ------------------------------------------------------------------


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port where a program accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.close()
    for conn in held:
        conn.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["occupied-c10d", "occupied-static", "missing-node"])
def test_a_rendezvous_that_cannot_happen_fails_in_one_line_within_the_timeout(
    case: str, silent_port: int, tmp_path: Path, started: list[subprocess.Popen[str]]
) -> None:
    # occupied: another program listens on the endpoint's port and never answers (torch's store
    # client waits for its answer forever); missing-node: the other machine never comes.
    endpoint = f"127.0.0.1:{free_port() if case == 'missing-node' else silent_port}"
    nodes = {"occupied-c10d": ["--nnodes", "1"], "occupied-static": ["--nnodes", "1", "--node-rank", "0"],
             "missing-node": ["--nnodes", "2"]}[case]
    timeout = 8
    began = time.monotonic()
    proc = start(started, [*TRAINER, "run", "--nproc-per-node", "1", *nodes, "--rdzv-endpoint", endpoint,
                           "--rdzv-timeout", str(timeout), *JOB, "--run-dir", str(tmp_path / "run")],
                 tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = finish(proc)
    took = time.monotonic() - began
    assert proc.returncode == 1, err
    [line] = err.strip().splitlines()
    assert line.startswith("error: ") and endpoint in line, line
    if case == "occupied-static":  # node 0 serves the endpoint itself: it cannot, and says so at once
        assert "another program already listens on that port" in line
    else:
        assert f"did not meet at {endpoint} within {timeout} s" in line
    assert took < timeout + 20  # the wait, plus starting Python and torch on a busy machine
    assert not (tmp_path / "run").exists()


def test_the_rendezvous_timeout_reaches_torchrun_for_either_rendezvous() -> None:
    c10d = torchrun_args(2, ["run"], nnodes=2, rdzv_endpoint="node0:29400", rdzv_timeout=30)
    assert c10d[c10d.index("--rdzv-conf") + 1] == "join_timeout=30"
    static = torchrun_args(2, ["run"], nnodes=2, node_rank=0, rdzv_endpoint="node0:29400", rdzv_timeout=30)
    assert static[static.index("--rdzv-conf") + 1] == "timeout=30"
    with pytest.raises(UsageError, match="--rdzv-timeout must be a whole number of seconds >= 1"):
        torchrun_args(2, ["run"], rdzv_timeout=0)


# -- 13: a launcher killed with SIGKILL -------------------------------------------------------


@pytest.mark.slow
def test_processes_stop_when_their_launcher_is_killed(tmp_path: Path, started: list[subprocess.Popen[str]]) -> None:
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        launcher = start(started, [*TRAINER, "run", "--nproc-per-node", "2", *JOB, "--epochs", "100000",
                                   "--run-dir", str(tmp_path / "run")], tmp_path, stdout=out, stderr=err)
    deadline = time.monotonic() + TIMEOUT_S
    while not (tmp_path / "run" / "metrics.jsonl").exists():  # both processes trained an epoch
        assert launcher.poll() is None, (tmp_path / "err").read_text()
        assert time.monotonic() < deadline, "the run never finished an epoch"
        time.sleep(0.2)
    workers = [pid for pid in descendants(launcher.pid) if b"trainer_core" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(workers) == 2
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    try:
        deadline = time.monotonic() + 20
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in workers if alive(pid)], "processes trained on after their launcher was killed"
    finally:
        kill(workers)


# -- 1: the working directory ---------------------------------------------------------------

# Modules the processes import, or used to import from the working directory: each leaves a mark.
SHADOWS = {"plugins/__init__.py": "plugins", "trainer_core_plugins/__init__.py": "trainer_core_plugins", "pluggy.py": "pluggy", "typing_extensions.py": "typing_extensions"}


def shadowing_folder(folder: Path) -> Path:
    for path, name in SHADOWS.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(f"open({str(folder / f'imported-{name}')!r}, 'w').close()\n")
    return folder


def marks(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("imported-*"))


def test_python_m_trainer_core_imports_nothing_from_the_working_directory(
    tmp_path: Path, started: list[subprocess.Popen[str]]
) -> None:
    cwd = shadowing_folder(tmp_path)
    proc = start(started, [sys.executable, "-m", "trainer_core", "plugins"], cwd,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = finish(proc)
    assert marks(cwd) == [] and proc.returncode == 0, err
    assert "checkpoint" in out and "error" not in out


@pytest.mark.slow
@pytest.mark.parametrize("how", ["python-m", "nproc-per-node"])
def test_runs_import_nothing_from_the_working_directory(how: str, tmp_path: Path,
                                                         started: list[subprocess.Popen[str]]) -> None:
    cwd = shadowing_folder(tmp_path)
    command = [sys.executable, "-m", "trainer_core", "run"] if how == "python-m" else [
        *TRAINER, "run", "--nproc-per-node", "2"]
    proc = start(started, [*command, *JOB, "--epochs", "1", "--run-dir", str(tmp_path / "run")], cwd,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = finish(proc)
    assert marks(cwd) == [] and proc.returncode == 0, err
