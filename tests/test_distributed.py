"""Distributed training: real processes started by torchrun, gloo on the CPU.

The slow tests share a few real runs (each start of torch in a process costs
seconds): a 2-process run launched by ``trainer run --nproc-per-node 2``, a
1-process run of the same job in this process, resumes across world sizes
(2 -> 1 here, 1 -> 2 through ``python -m torch.distributed.run``), and a run
whose plugin raises on rank 1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from click.testing import CliRunner
from tensorboard.backend.event_processing import event_accumulator

from trainer_core.cli import LAUNCHER_OPTIONS, make_cli, worker_args
from trainer_core.data import Batches, TensorSplit, epoch_order
from trainer_core.distributed import is_rank_zero_only, rank_zero_only, shard_bounds
from trainer_core.launcher import torchrun_args
from trainer_core.errors import UsageError
from trainer_core.testing import run_tiny, write_fake_distribution

# A plugin package for the runs: installed as real metadata on PYTHONPATH.
PROBE = '''
from __future__ import annotations

from pathlib import Path

from trainer_core import hookimpl
from trainer_core.distributed import rank_zero_only


class Probe:
    """On every rank: records the training-loss logs; saves them and the parameters at the end."""

    def __init__(self, out: str = "") -> None:
        self.out = Path(out)
        self.losses = []

    @hookimpl
    def on_train_log(self, trainer, metrics):
        self.losses.append((trainer.state.step, metrics["train/loss"], metrics["train/samples"]))

    @hookimpl
    def on_fit_end(self, trainer):
        import torch

        self.out.mkdir(parents=True, exist_ok=True)
        record = {"rank": trainer.rank, "world_size": trainer.world_size, "losses": self.losses,
                  "params": trainer.model.state_dict(), "history": trainer.state.history}
        torch.save(record, self.out / f"rank{trainer.rank}.pt")


@rank_zero_only
class ZeroOnly:
    """Declared rank-zero-only: leaves a mark naming the rank it ran on."""

    def __init__(self, out: str = "") -> None:
        self.out = Path(out)

    @hookimpl
    def on_fit_start(self, trainer):
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"zero-only-ran-on-rank{trainer.rank}").write_text("")


class SyncCounter:
    """Counts the gradient all-reduces of this rank's DistributedDataParallel (a comm hook)."""

    def __init__(self, out: str = "") -> None:
        self.out = Path(out)
        self.syncs = 0

    @hookimpl
    def on_fit_start(self, trainer):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting(state, bucket):
            self.syncs += 1
            return allreduce_hook(state, bucket)
        trainer.train_forward.register_comm_hook(None, counting)

    @hookimpl
    def on_fit_end(self, trainer):
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"syncs-rank{trainer.rank}").write_text(str(self.syncs))


class Poison:
    """Makes one rank's inputs NaN at one step (the whole batch's in one process)."""

    def __init__(self, rank: int = 1, step: int = 3) -> None:
        self.rank, self.step = rank, step

    @hookimpl
    def on_batch_start(self, trainer, inputs):
        if trainer.rank == self.rank and trainer.state.step + 1 == self.step:
            inputs.fill_(float("nan"))


class StopAt:
    """Asks for a stop on rank 0 after one step."""

    def __init__(self, step: int = 5) -> None:
        self.step = step

    @hookimpl
    def on_batch_end(self, trainer):
        if trainer.rank == 0 and trainer.state.step == self.step:
            trainer.request_stop(f"asked at step {self.step}")


class KeepCopy:
    """Keeps a copy of the run's last.pt as the training of step ``step + 1`` starts (rank 0)."""

    def __init__(self, step: int = 18, out: str = "") -> None:
        self.step, self.out = step, Path(out)

    @hookimpl
    def on_batch_start(self, trainer):
        import shutil

        if trainer.rank == 0 and trainer.state.step == self.step:
            shutil.copy(trainer.run_path / "checkpoints" / "last.pt", self.out)


class Hold:
    """Holds every rank after one step until that rank receives a stop signal (a minute at most)."""

    def __init__(self, step: int = 3) -> None:
        self.step = step

    @hookimpl
    def on_batch_end(self, trainer):
        import time

        if trainer.state.step == self.step:
            print(f"rank {trainer.rank} holding after step {self.step}", flush=True)
            deadline = time.monotonic() + 60
            while trainer.signals.received is None and time.monotonic() < deadline:
                time.sleep(0.02)


class Boom:
    """Raises on one rank at one step."""

    def __init__(self, rank: int = 1, step: int = 2) -> None:
        self.rank, self.step = rank, step

    @hookimpl
    def on_batch_end(self, trainer):
        if trainer.rank == self.rank and trainer.state.step == self.step:
            raise RuntimeError(f"boom on rank {trainer.rank} at step {self.step}")
'''

# The job every run shares.  91 training samples in batches of 8: the last
# batch holds 3, split 2 + 1 between 2 processes and weighted so that each
# sample counts once (unweighted, DDP's average of the two parts' means would
# weigh the lone sample double); 45 validation samples: uneven shards of 23 and 22.
# No dropout, so one process and two compute the same function.  The
# convolutions stay frozen until epoch 3: the distributed runs must then
# rebuild DDP to reduce their gradients too (or the ranks would drift apart).
JOB = [
    "--dataset", "fake", "-o", "dataset.train_size=91", "-o", "dataset.val_size=45", "-o", "dataset.num_classes=4",
    "-o", "dataset.noise=2.0", "-o", "model.width=4", "-o", "model.dropout=0", "--batch-size", "8",
    "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--log-every", "1", "--seed", "3", "--quiet",
    # Every epoch's checkpoint is kept (save_top_k=-1): resumes start from epoch 2's.
    "--plugins", "checkpoint", "-o", "checkpoint.restore_best=false", "-o", "checkpoint.monitor=val/loss",
    "-o", "checkpoint.save_top_k=-1",
    "--plugins", "freeze", "-o", "freeze.freeze=features", "-o", "freeze.unfreeze_at_epoch=3",
]
# How far a 2-process run may drift from a 1-process run of the same job.  DDP
# averages two half-batch gradients where one process takes one mean over the
# batch (the core scales the uneven last batch so that the two are equal in
# exact arithmetic); float32 sums in another order differ by ~1e-7 relative per
# step, and 36 SGD steps with momentum amplify that to ~1e-6 at most, so 1e-4
# leaves a margin and still catches any real difference (a wrong weighting of
# the last batch changes the losses in the second or third digit).
RTOL = 1e-4
SUBPROCESS_TIMEOUT = 240  # a hang fails the test instead of blocking CI


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The probe package, importable here and (through PYTHONPATH) in the runs' processes."""
    folder = write_fake_distribution(
        tmp_path_factory.mktemp("site"), "dist-probe",
        {"trainer.plugins": {"probe": "dist_probe:Probe", "zero-only": "dist_probe:ZeroOnly", "boom": "dist_probe:Boom",
                            "sync-counter": "dist_probe:SyncCounter", "poison": "dist_probe:Poison",
                            "hold": "dist_probe:Hold", "stop-at": "dist_probe:StopAt", "keep-copy": "dist_probe:KeepCopy"}},
        modules={"dist_probe": PROBE},
    )
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("dist_probe", None)


def env_with(site: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("TRAINER_DEBUG", None)
    return env


def run_processes(args: list[str], site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], env=env_with(site), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT
    )


def run_here(args: list[str]) -> None:
    """A 1-process run in this process, through the real CLI."""
    result = CliRunner().invoke(make_cli(), ["run", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def probe(out: Path) -> list[str]:
    return ["--plugins", "probe,zero-only", "-o", f"probe.out={out}", "-o", f"zero-only.out={out}"]


@pytest.fixture(scope="module")
def runs(site: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run the job: 2 epochs in 2 processes, 3 epochs in 1 (the reference),
    then a third epoch from each one's epoch-2 checkpoint in the other world size."""
    root = tmp_path_factory.mktemp("runs")
    two = run_processes(
        ["-m", "trainer_core", "run", "--nproc-per-node", "2", *JOB, "--epochs", "2", "--run-dir", str(root / "two"),
         "--plugins", "tensorboard", *probe(root / "two-probe")], site,
    )
    assert two.returncode == 0, two.stderr
    run_here([*JOB, "--epochs", "3", "--run-dir", str(root / "one"), *probe(root / "one-probe")])
    run_here([*JOB, "--epochs", "3", "--resume", str(epoch2(root / "two")),
              "--run-dir", str(root / "two-then-one"), *probe(root / "two-then-one-probe")])
    one_then_two = run_processes(
        ["-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "trainer_core", "run", *JOB, "--epochs", "3",
         "--resume", str(epoch2(root / "one")), "--run-dir", str(root / "one-then-two"),
         *probe(root / "one-then-two-probe")], site,
    )
    assert one_then_two.returncode == 0, one_then_two.stderr
    return {"root": root}


def epoch2(run: Path) -> Path:
    [found] = (run / "checkpoints").glob("best-epoch002-*.pt")
    return found


def probed(runs: dict[str, Path], name: str, rank: int = 0) -> dict[str, Any]:
    return torch.load(runs["root"] / f"{name}-probe" / f"rank{rank}.pt", weights_only=True)


def assert_close_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=RTOL, atol=RTOL, msg=lambda m: f"{key}: {m}")


# -- real runs -----------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_end_with_identical_parameters_and_metrics(runs: dict[str, Path]) -> None:
    rank0, rank1 = probed(runs, "two", 0), probed(runs, "two", 1)
    assert (rank0["world_size"], rank1["world_size"]) == (2, 2)
    for key, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][key]), key
    # Logged losses and evaluation metrics are reduced over the ranks: equal on both.
    assert rank0["losses"] == rank1["losses"] and len(rank0["losses"]) == 2 * 12
    assert rank0["history"] == rank1["history"]
    summary = json.loads((runs["root"] / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["status"] == "completed" and summary["steps"] == 24


@pytest.mark.slow
def test_metrics_of_two_processes_equal_one_process_evaluating_the_saved_weights(runs: dict[str, Path]) -> None:
    from trainer_core.checkpointing import load_checkpoint
    from trainer_core.config import apply_mapping, RunConfig
    from trainer_core.runner import build_run

    folder = runs["root"] / "two"
    checkpoint = load_checkpoint(folder / "checkpoints" / "last.pt")
    config = apply_mapping(RunConfig(), checkpoint["config"], "the checkpoint")
    config.plugins = {}
    trainer = build_run(config, write_files=False)
    trainer.model.load_state_dict(checkpoint["model"])
    assert trainer.world_size == 1 and trainer.val_batches.size == 45
    alone = trainer.evaluate()
    recorded = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()][-1]
    assert recorded["epoch"] == 2
    assert recorded["val/acc"] == alone["val/acc"]  # counts: exact
    assert 0 < recorded["val/acc"] < 1  # a metric that could differ
    # Losses: one float32 mean per batch, and the two runs batch the samples differently.
    assert recorded["val/loss"] == pytest.approx(alone["val/loss"], rel=1e-6)


@pytest.mark.slow
def test_two_processes_follow_the_loss_curve_of_one(runs: dict[str, Path]) -> None:
    one, two = probed(runs, "one"), probed(runs, "two")
    one["losses"] = one["losses"][:24]  # the reference ran a third epoch
    assert [step for step, _, _ in one["losses"]] == [step for step, _, _ in two["losses"]]
    # The same samples in every step (the same global batch), the last one included.
    assert [n for _, _, n in one["losses"]] == [n for _, _, n in two["losses"]]
    assert one["losses"][11][2] == 3
    for (step, a, _), (_, b, _) in zip(one["losses"], two["losses"]):
        assert b == pytest.approx(a, rel=RTOL), f"step {step}"
    two_weights = torch.load(epoch2(runs["root"] / "two"), weights_only=True)["model"]
    assert_close_params(torch.load(epoch2(runs["root"] / "one"), weights_only=True)["model"], two_weights)
    assert one["losses"][0][1] != pytest.approx(one["losses"][-1][1], rel=0.05)  # it did learn


@pytest.mark.slow
def test_only_rank_zero_writes(runs: dict[str, Path]) -> None:
    folder = runs["root"] / "two"
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    events = [f for f in files if f.startswith("events.out.tfevents.")]
    assert len(events) == 1, files
    assert len([f for f in files if f.startswith("checkpoints/best-")]) == 2
    assert files == sorted(["config.toml", "metrics.jsonl", "summary.json", "checkpoints/last.pt", *events,
                            *[f for f in files if f.startswith("checkpoints/best-")]])
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 2
    reader = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    reader.Reload()
    assert [e.step for e in reader.Scalars("val/acc")] == [12, 24]
    assert [e.step for e in reader.Scalars("train/loss")] == list(range(1, 25))
    # The rank-zero-only plugin ran on rank 0 only.
    marks = sorted(p.name for p in (runs["root"] / "two-probe").glob("zero-only-*"))
    assert marks == ["zero-only-ran-on-rank0"]


@pytest.mark.slow
def test_resume_two_to_one_and_one_to_two(runs: dict[str, Path]) -> None:
    reference = probed(runs, "one")
    reference["losses"] = reference["losses"][24:]
    for name in ("two-then-one", "one-then-two"):
        resumed = probed(runs, name)
        assert resumed["history"][-1]["epoch"] == 3 and resumed["history"][-1]["step"] == 36
        assert [s for s, _, _ in resumed["losses"]] == list(range(25, 37)), name
        for (step, a, _), (_, b, _) in zip(reference["losses"], resumed["losses"]):
            assert b == pytest.approx(a, rel=RTOL), f"{name} step {step}"
        assert_close_params(reference["params"], resumed["params"])
    two = probed(runs, "one-then-two", 1)
    assert two["world_size"] == 2
    for key, value in probed(runs, "one-then-two", 0)["params"].items():
        assert torch.equal(value, two["params"][key]), key
    # The checkpoint plugin's state came along: it still knows the best checkpoint of the first part.
    checkpoint = torch.load(runs["root"] / "two-then-one" / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["state"]["step"] == 36 and checkpoint["optimizer"]["state"]


@pytest.mark.slow
def test_accumulating_ranks_all_reduce_only_in_the_batch_that_steps(site: Path, tmp_path: Path) -> None:
    # 12 batches an epoch, 3 to a step: 4 optimizer steps an epoch, 8 in all.
    job = [*JOB, "--epochs", "2", "--accumulate-grad-batches", "3"]
    two = run_processes(
        ["-m", "trainer_core", "run", "--nproc-per-node", "2", *job, "--run-dir", str(tmp_path / "two"),
         "--plugins", "sync-counter", "-o", f"sync-counter.out={tmp_path / 'syncs'}", *probe(tmp_path / "two-probe")],
        site,
    )
    assert two.returncode == 0, two.stderr
    # One all-reduce per optimizer step (the tiny model's gradients fit one bucket), not one per batch (24).
    assert [(tmp_path / "syncs" / f"syncs-rank{rank}").read_text() for rank in (0, 1)] == ["8", "8"]
    run_here([*job, "--run-dir", str(tmp_path / "one"), *probe(tmp_path / "one-probe")])
    one, two_ranks = (torch.load(tmp_path / f"{name}-probe" / "rank0.pt", weights_only=True) for name in ("one", "two"))
    # The same updates as one process accumulating the same batches.
    assert [n for _, _, n in one["losses"]] == [n for _, _, n in two_ranks["losses"]]
    for (step, a, _), (_, b, _) in zip(one["losses"], two_ranks["losses"]):
        assert b == pytest.approx(a, rel=RTOL), f"step {step}"
    assert_close_params(one["params"], two_ranks["params"])
    rank1 = torch.load(tmp_path / "two-probe" / "rank1.pt", weights_only=True)
    for key, value in two_ranks["params"].items():
        assert torch.equal(value, rank1["params"][key]), key


@pytest.mark.slow
def test_a_resume_in_as_many_processes_continues_every_rank_s_random_stream(site: Path, tmp_path: Path) -> None:
    # Dropout draws from each rank's own random stream: rank 1's masks after the resume
    # match the uninterrupted run only if its stream was saved and restored too.
    job = [arg if arg != "model.dropout=0" else "model.dropout=0.3" for arg in JOB] + ["--epochs", "2"]

    def two_processes(*args: str) -> None:
        done = run_processes(["-m", "trainer_core", "run", "--nproc-per-node", "2", *job, *args], site)
        assert done.returncode == 0, done.stderr

    two_processes("--run-dir", str(tmp_path / "whole"), *probe(tmp_path / "whole-probe"))
    [first_epoch] = (tmp_path / "whole" / "checkpoints").glob("best-epoch001-*.pt")
    assert len(torch.load(first_epoch, weights_only=True)["rank_rng"]) == 2
    two_processes("--resume", str(first_epoch), "--run-dir", str(tmp_path / "resumed"), *probe(tmp_path / "resumed-probe"))
    whole, resumed = (torch.load(tmp_path / f"{name}-probe" / "rank0.pt", weights_only=True) for name in ("whole", "resumed"))
    for key, value in whole["params"].items():
        assert torch.equal(value, resumed["params"][key]), key
    assert resumed["losses"] == whole["losses"][12:]  # the second epoch's losses, bit for bit


@pytest.mark.slow
def test_a_mid_interval_resume_logs_every_rank_s_part_of_the_interval(site: Path, tmp_path: Path) -> None:
    # Saved at step 18, between the logs of steps 16 and 20: the checkpoint must hold both ranks'
    # losses of steps 17-18, or the resumed run's step-20 log (and its epoch's mean) lacks rank 1's.
    job = [*JOB, "--epochs", "2", "-o", "checkpoint.every_n_steps=6"]
    job[job.index("--log-every") + 1] = "4"
    copy = tmp_path / "step18.pt"

    def two_processes(name: str, *args: str) -> tuple[list[Any], dict[str, float]]:
        done = run_processes(["-m", "trainer_core", "run", "--nproc-per-node", "2", *job, "--run-dir", str(tmp_path / name),
                              *probe(tmp_path / f"{name}-probe"), *args], site)
        assert done.returncode == 0, done.stderr
        last_epoch = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])
        return torch.load(tmp_path / f"{name}-probe" / "rank0.pt", weights_only=True)["losses"], last_epoch

    whole, whole_epoch = two_processes("whole", "--plugins", "keep-copy", "-o", "keep-copy.step=18", "-o", f"keep-copy.out={copy}")
    assert torch.load(copy, weights_only=True)["state"]["step"] == 18
    resumed, resumed_epoch = two_processes("resumed", "--resume", str(copy), "--plugins", "no:keep-copy")
    after = [log for log in whole if log[0] > 18]
    assert [log[0] for log in resumed] == [log[0] for log in after] == [20, 24]
    for (_, loss, samples), (_, expected, expected_samples) in zip(resumed, after):
        assert (loss, samples) == (pytest.approx(expected, rel=1e-12), expected_samples)
    assert resumed_epoch["train/loss"] == pytest.approx(whole_epoch["train/loss"], rel=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("accumulate, step, size", [(1, 3, 8), (3, 12, 3)], ids=["a-step", "the-last-of-an-accumulation"])
def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(
    site: Path, tmp_path: Path, accumulate: int, step: int, size: int
) -> None:
    # Skipping the epoch's last batch, which was to average the accumulated gradients, steps with them averaged anyway.
    job = [*JOB, "--epochs", "1", "--nonfinite", "skip", "--plugins", "poison", "-o", f"poison.step={step}",
           "--accumulate-grad-batches", str(accumulate)]
    two = run_processes(["-m", "trainer_core", "run", "--nproc-per-node", "2", *job, "--run-dir", str(tmp_path / "two"),
                         *probe(tmp_path / "two-probe")], site)
    assert two.returncode == 0, two.stderr
    # The same step skipped in one process, whose whole batch is poisoned.
    run_here([*job, "-o", "poison.rank=0", "--run-dir", str(tmp_path / "one"), *probe(tmp_path / "one-probe")])
    for name in ("one", "two"):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert (summary["status"], summary["skipped_steps"], summary["steps"]) == ("completed", 1, 12), name
    one, two_ranks = (torch.load(tmp_path / f"{name}-probe" / "rank0.pt", weights_only=True) for name in ("one", "two"))
    rank1 = torch.load(tmp_path / "two-probe" / "rank1.pt", weights_only=True)
    for key, value in two_ranks["params"].items():
        assert torch.isfinite(value).all() and torch.equal(value, rank1["params"][key]), key
    assert_close_params(one["params"], two_ranks["params"])
    # The poisoned batch's samples are counted nowhere.
    assert sum(n for _, _, n in two_ranks["losses"]) == sum(n for _, _, n in one["losses"]) == 91 - size


@pytest.mark.slow
def test_a_checkpoint_after_a_poisoned_step_is_refused_on_every_rank_alike(site: Path, tmp_path: Path) -> None:
    # The skipped batch's forward pass still made rank 1's batch-norm statistics NaN (until the next
    # forward pass brings rank 0's), and the ranks agree to stop right after it: the save at the
    # stop must be refused on both ranks, or rank 0 would wait for rank 1 in the save's gathering.
    job = ["-m", "trainer_core", "run", "--nproc-per-node", "2", "--dataset", "fake", "-o", "dataset.channels=3",
           "-o", "dataset.image_size=32", "-o", "dataset.train_size=48", "-o", "dataset.val_size=16",
           "-o", "dataset.num_classes=4", "--model", "resnet18", "--batch-size", "8", "--epochs", "1", "--optimizer", "sgd",
           "--nonfinite", "skip", "--log-every", "3", "--plugins", "poison,stop-at,checkpoint", "-o", "poison.step=3",
           "-o", "stop-at.step=3", "-o", "checkpoint.restore_best=false", "--run-dir", str(tmp_path / "run")]
    done = run_processes(job, site)
    assert done.returncode == 0, done.stderr
    assert "stopped early: asked at step 3" in done.stdout
    assert "the weights hold NaN or infinity at step 3" in done.stderr
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


@pytest.mark.slow
def test_a_signal_to_the_whole_process_group_with_loader_workers_stops_every_rank_and_resumes(site: Path, tmp_path: Path) -> None:
    # As a job scheduler sends it: torchrun, both ranks and their loader processes get it. (Ctrl-C's SIGINT takes
    # the same path, torchrun's SignalException; test_reliability sends both to one process and its loader workers.)
    signum = signal.SIGTERM
    from test_datasets import write_image_tree

    write_image_tree(tmp_path / "images", per_class=16, size=(12, 12))  # 32 training images: 8 steps of 4
    job = ["-m", "trainer_core", "run", "--nproc-per-node", "2", "--dataset", "imagefolder", "--data-root",
           str(tmp_path / "images"), "-o", "dataset.image_size=8", "--model", "mlp", "--num-workers", "2",
           "--epochs", "2", "--batch-size", "4", "--log-every", "5", "-q", "--plugins", "checkpoint",
           "--run-dir", str(tmp_path / "run")]
    proc = subprocess.Popen([sys.executable, *job, "--plugins", "hold"], env=env_with(site), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    held = 0
    for line in iter(proc.stdout.readline, ""):  # (ends early if the run does)
        held += line.count("holding after step 3")  # the two ranks' lines may share one
        if held == 2:
            break
    os.killpg(proc.pid, signum)
    _, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert held == 2 and proc.returncode == 128 + signum, err
    # The ranks stop together at the next logging step and the checkpoint plugin saves there.
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["state"]["step"] == 5
    resumed = run_processes([*job, "--resume", "auto"], site)
    assert resumed.returncode == 0, resumed.stderr
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert (last["state"]["epoch"], last["state"]["step"]) == (2, 16)


@pytest.mark.slow
def test_a_plugin_raising_on_rank_one_ends_the_run_with_its_error(site: Path, tmp_path: Path) -> None:
    result = run_processes(
        ["-m", "trainer_core", "run", "--nproc-per-node", "2", *JOB, "--epochs", "2", "--run-dir", str(tmp_path / "run"),
         "--plugins", "boom"], site,
    )
    assert result.returncode == 1
    message = "plugin 'boom' failed in on_batch_end: RuntimeError: boom on rank 1 at step 2"
    assert f"error: rank 1: {message}" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: process rank 1 failed (exit status 1): {message}"
    summary = tmp_path / "run" / "summary.json"
    assert not summary.exists() or json.loads(summary.read_text())["status"] != "completed"


# A library user's script under torchrun: what is left of the strategy's wrapper once fit() returns.
WRAPPERS_LEFT = """
import gc
import torch
from trainer_core.testing import run_tiny

trainer = run_tiny(epochs=1)
gc.collect()
left = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
print(f"rank {trainer.rank}: {left} wrappers, trains the model itself: {trainer.train_forward is trainer.model}", flush=True)
"""


@pytest.mark.slow
def test_a_finished_fit_leaves_no_ddp_wrapper_for_the_exit_to_free(site: Path, tmp_path: Path) -> None:
    # Freed by the garbage collector while the interpreter exits, DDP's wrapper makes gloo abort the process
    # ("terminate called without an active exception") after a complete run, now and then.
    script = tmp_path / "fit.py"
    script.write_text(WRAPPERS_LEFT)
    result = run_processes(["-m", "torch.distributed.run", "--nproc-per-node", "2", str(script)], site)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split("\n"))[1:] == [f"rank {r}: 0 wrappers, trains the model itself: True" for r in (0, 1)]


@pytest.mark.slow
def test_a_batch_that_does_not_split_over_the_processes_is_refused_before_the_run_folder(site: Path, tmp_path: Path) -> None:
    result = run_processes(
        ["-m", "trainer_core", "run", "--nproc-per-node", "2", *JOB, "--batch-size", "7", "--run-dir", str(tmp_path / "run")],
        site,
    )
    message = "batch size 7 is the global batch and must split evenly over 2 processes; use a multiple of 2"
    # The launcher refuses before starting any process: one line, not one per rank.
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {message}"
    assert not (tmp_path / "run").exists()


# -- pieces, in this process ----------------------------------------------------


def test_shard_bounds_cover_every_item_once_in_near_equal_parts() -> None:
    for size in range(0, 12):
        for world in range(1, 5):
            parts = [shard_bounds(size, rank, world) for rank in range(world)]
            assert [i for start, stop in parts for i in range(start, stop)] == list(range(size))
            lengths = [stop - start for start, stop in parts]
            assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)


@pytest.mark.parametrize("loader", [False, True], ids=["tensors", "dataloader"])
@pytest.mark.parametrize("size", [23, 24, 25])
def test_ranks_split_each_global_batch_and_the_validation_split(loader: bool, size: int) -> None:
    inputs, targets = torch.zeros(size, 1, 1, 1), torch.arange(size)
    split = torch.utils.data.TensorDataset(inputs, targets) if loader else TensorSplit(inputs, targets)
    for world in (1, 2, 3, 4):
        train = [Batches(split, 12, torch.device("cpu"), shuffle=True, seed=5, num_workers=0, rank=r, world_size=world)
                 for r in range(world)]
        assert {len(b) for b in train} == {-(-size // 12)}  # the same steps on every rank
        parts = [[t.tolist() for _, t in b.iterate(epoch=2)] for b in train]
        order = epoch_order(size, 5, 2).tolist()
        for step in range(len(train[0])):
            batch = order[step * 12 : step * 12 + 12]
            real = [part[step] for part, b in zip(parts, train) if not (b.uneven and b.uneven[0] == step and b.uneven[2] == 0)]
            assert sum(real, []) == batch
            for b, part in zip(train, parts):
                if b.uneven and b.uneven[0] == step:
                    count = b.uneven[2]
                    assert b.uneven[1] == count * world / len(batch)  # scaled so every sample weighs 1/len(batch)
                    assert len(part[step]) == max(count, 1)
        # A mid-epoch start skips whole steps.
        assert [t.tolist() for _, t in train[-1].iterate(epoch=2, start_batch=1)] == parts[-1][1:]
        val = [Batches(split, 4, torch.device("cpu"), shuffle=False, num_workers=0, rank=r, world_size=world)
               for r in range(world)]
        assert [i for b in val for _, t in b.iterate() for i in t.tolist()] == list(range(size))


def test_torchrun_command_lines() -> None:
    # From Python 3.11 the processes start with -P: nothing is imported from the working directory.
    python = ["--no-python", sys.executable, "-P", "-u"] if sys.version_info >= (3, 11) else []
    assert torchrun_args(2, ["run", "--epochs", "1"]) == [
        "--nproc-per-node", "2", "--nnodes", "1", *python, "-m", "trainer_core", "run", "--epochs", "1"]
    assert torchrun_args(4, ["run"], nnodes=2, node_rank=1, rdzv_endpoint="node0:29400")[:8] == [
        "--nproc-per-node", "4", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "node0:29400"]
    assert "c10d" in torchrun_args(4, ["run"], nnodes=2, rdzv_endpoint="node0:29400")
    for kwargs, message in [
        (dict(nproc_per_node=0), "--nproc-per-node must be >= 1"),
        (dict(nproc_per_node=2, nnodes=2), "needs --rdzv-endpoint"),
        (dict(nproc_per_node=2, nnodes=2, node_rank=2, rdzv_endpoint="h:1"), "--node-rank must be in [0, 1]"),
        (dict(nproc_per_node=2, nnodes=2, rdzv_endpoint="nohost"), "HOST:PORT"),
    ]:
        with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
            torchrun_args(worker_args=["run"], **kwargs)


def test_workers_get_the_command_line_without_the_launcher_options() -> None:
    command = make_cli().commands["run"]
    given = ["--nproc-per-node", "2", "--nnodes", "1", "--epochs", "3", "--plugins", "a", "--plugins", "b,c",
             "-o", "a.x=1", "--quiet", "--channels-last", "--backend", "gloo", "--resume", "runs/x"]
    ctx = command.make_context("run", list(given))
    args = worker_args(ctx, LAUNCHER_OPTIONS)
    assert args[0] == "run"
    again = command.make_context("run", args[1:]).params
    assert again == {**ctx.params, **{name: None for name in LAUNCHER_OPTIONS}}
    assert "--nproc-per-node" not in args and "--backend" in args


@pytest.mark.parametrize("args, message", [
    (["--nnodes", "2"], "--nnodes only make sense with --nproc-per-node N"),
    (["--backend", "gloo"], "--backend is for a run in several processes"),
    (["--nproc-per-node", "0"], "--nproc-per-node must be >= 1"),
])
def test_launcher_options_are_checked_before_anything_starts(args: list[str], message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(make_cli(), ["run", "--dataset", "fake", "--run-dir", str(tmp_path / "run"), *args])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "run").exists()


def test_rank_zero_only_marker_and_single_process_helpers() -> None:
    @rank_zero_only
    class Decorated:
        pass

    class Attribute:
        rank_zero_only = True

    class Plain:
        rank_zero_only = "yes"  # only True counts

    assert is_rank_zero_only(Decorated) and is_rank_zero_only(Decorated()) and is_rank_zero_only(Attribute())
    assert not is_rank_zero_only(Plain()) and not is_rank_zero_only(object())
    # In one process a rank-zero-only plugin runs (this is rank zero) and collectives are the identity.
    seen: list[int] = []

    @rank_zero_only
    class Mark:
        from trainer_core import hookimpl

        @hookimpl
        def on_fit_start(self, trainer: Any) -> None:
            seen.append(trainer.rank)

    trainer = run_tiny({"mark": Mark()}, epochs=1)
    assert seen == [0] and (trainer.rank, trainer.world_size, trainer.distributed) == (0, 1, False)
    counts = torch.tensor([1.0, 2.0])
    assert trainer.all_reduce(counts) is counts and counts.tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="all_reduce op must be one of"):
        trainer.all_reduce(counts, "mean")  # type: ignore[arg-type]


def test_each_rank_names_itself_and_the_launcher_reports_the_rank_that_failed_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch.distributed import DistBackendError
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from trainer_core.launcher import record_error, worker_failure, worker_label, worker_message

    assert worker_label() == "" and worker_message("x", DistBackendError("gone")) == "x"  # not under torchrun
    monkeypatch.setenv("WORLD_SIZE", "3")
    files = []
    # Rank 0 only lost its peers (recorded first), rank 1 raised, rank 2 was killed without a word.
    for rank, exc in [(0, DistBackendError("Connection closed by peer")), (1, ValueError("bad value")), (2, None)]:
        monkeypatch.setenv("RANK", str(rank))
        files.append(tmp_path / f"error{rank}.json")
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(files[-1]))
        if exc is not None:
            message = worker_message(str(exc), exc)
            assert worker_label() == f"rank {rank}: "
            record_error(message, exc)
    assert json.loads(files[0].read_text())["message"].startswith("another process of the run went away")
    failures = {rank: ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file=str(files[rank]))
                for rank, code in [(0, 1), (1, 2), (2, -9)]}
    error = worker_failure(ChildFailedError("trainer_core", failures))
    assert str(error) == "process rank 1 failed (exit status 2): bad value" and error.exit_code == 2
    del failures[1]
    assert str(worker_failure(ChildFailedError("trainer_core", failures))) == "process rank 2 failed (exit status -9): killed by SIGKILL"
