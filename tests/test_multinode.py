"""Two machines, simulated on one: two separate ``trainer run --nnodes 2`` launches.

Each "node" is its own process tree (its own torchrun agent and worker) started
from its own working directory with a relative ``--runs-root``, as two machines
with their own disks would run it.  Both meet at a rendezvous endpoint on
127.0.0.1 and train the default dataset (digits) with gloo.  The result must be
what one machine running the same job in two processes computes, and only node
0 (where global rank 0 runs) may write anything.

Every process runs with one thread (``OMP_NUM_THREADS=1``): a 1-process node
would otherwise take both cores and sum some floats in another order than the
2-process run's processes (measured: ~1e-8 relative), and with the same
thread count the runs are bit for bit identical.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The job: digits, a narrow smallcnn (dropout on: each global rank draws from its own
# random stream, which a node must not change), 2 epochs of 45 steps, every epoch checkpointed.
JOB = [
    "--model", "smallcnn", "-o", "model.width=8", "--epochs", "2", "--batch-size", "32", "--seed", "1",
    "--device", "cpu", "--log-every", "5", "--plugins", "checkpoint", "-o", "checkpoint.restore_best=false",
    "--name", "job", "--runs-root", "runs",  # relative: each node's runs go to its own working directory
]
TIMEOUT_S = 240  # a run that hangs fails the test instead of blocking CI


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TRAINER_DIST_TIMEOUT="120")  # a worker left alone gives up in 2 minutes
    env.pop("TRAINER_DEBUG", None)
    return env


def start(cwd: Path, *args: str) -> subprocess.Popen[str]:
    """``trainer run ARGS`` in ``cwd``, in its own session (so its process group can be killed)."""
    cwd.mkdir(parents=True)
    return subprocess.Popen(
        [sys.executable, "-m", "trainer_core", "run", *args, *JOB], cwd=cwd, env=environment(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def descendants(pid: int) -> list[int]:
    """``pid``'s children, grandchildren...: torchrun starts each worker in a session of its own."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def kill_tree(proc: subprocess.Popen[str]) -> None:
    for pid in descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def finish(*procs: subprocess.Popen[str]) -> list[tuple[int, str, str]]:
    """Wait for every process (``TIMEOUT_S`` at most); on a timeout or a failure, kill every tree."""
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT_S)
            results.append((proc.returncode, out, err))
    finally:
        if len(results) < len(procs) or any(code != 0 for code, _, _ in results):
            for proc in procs:
                if proc.returncode is None:
                    kill_tree(proc)
    for code, out, err in results:
        assert code == 0, f"exit status {code}\n{out}\n{err}"
    return results


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def records(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_processes_one_node(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same job in 2 processes on one machine."""
    cwd = tmp_path_factory.mktemp("single") / "node"
    finish(start(cwd, "--nproc-per-node", "2"))
    return cwd / "runs" / "job"


def assert_same_run(run: Path, reference: Path) -> None:
    ours, theirs = records(run), records(reference)
    assert [r["step"] for r in ours] == [45, 90]
    assert ours == theirs  # every metric, bit for bit (floats compared exactly)
    assert 0.5 < ours[-1]["val/acc"] < 1  # it learned, and could have differed
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["processes"], summary["steps"]) == ("completed", 2, 90)
    weights, expected = (torch.load(r / "checkpoints" / "last.pt", weights_only=True)["model"] for r in (run, reference))
    assert weights.keys() == expected.keys()
    for key in weights:
        assert torch.equal(weights[key], expected[key]), key


@pytest.mark.slow
def test_two_nodes_with_fixed_ranks_train_as_one_node_and_only_node_zero_writes(
    tmp_path: Path, two_processes_one_node: Path
) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    launcher = ["--nnodes", "2", "--rdzv-endpoint", endpoint, "--nproc-per-node", "1"]
    # Node 1 first: it waits at node 0's endpoint until node 0 comes up.
    node1 = start(tmp_path / "node1", *launcher, "--node-rank", "1")
    node0 = start(tmp_path / "node0", *launcher, "--node-rank", "0")
    (_, out0, _), (_, out1, _) = finish(node0, node1)
    run = tmp_path / "node0" / "runs" / "job"
    assert "run folder: runs/job" in out0
    assert out1 == ""  # console output is rank zero's
    assert files_under(tmp_path / "node1") == []  # node 1 wrote nothing on its disk
    assert {"config.toml", "metrics.jsonl", "summary.json", "checkpoints/last.pt"} <= set(files_under(run))
    assert_same_run(run, two_processes_one_node)


@pytest.mark.slow
def test_two_nodes_ranked_by_arrival_train_as_one_node_and_one_node_writes(
    tmp_path: Path, two_processes_one_node: Path
) -> None:
    # Without --node-rank, torchrun's c10d rendezvous numbers the nodes: either may get rank 0.
    endpoint = f"127.0.0.1:{free_port()}"
    launcher = ["--nnodes", "2", "--rdzv-endpoint", endpoint, "--nproc-per-node", "1"]
    finish(start(tmp_path / "a", *launcher), start(tmp_path / "b", *launcher))
    written = {name: files_under(tmp_path / name) for name in ("a", "b")}
    [writer] = [name for name, files in written.items() if files]  # the other node wrote nothing
    assert_same_run(tmp_path / writer / "runs" / "job", two_processes_one_node)
