"""Fault injection: a tiny run is killed again and again at random points (in training, in
evaluation, while it appends a metrics record, inside a checkpoint save and between the
files of one, before it deletes an evicted best file, as a continued run starts; SIGKILL
and SIGTERM) and continued each time with the same command and ``--resume auto``, as a
scheduler requeues it.  It must end bit-identical to a run never stopped (weights,
optimizer state, plugin state, best checkpoints, ``metrics.jsonl``) and leave exactly the
files that run left: no temporary file, no orphan best checkpoint, no lock file.  Real
``python -m trainer_core run`` processes, real signals.  The points are around every write
of checkpoints and metrics; between them a run writes only its ``config.toml`` and
``summary.json`` (atomically), so a kill elsewhere leaves what a kill at a point leaves.

The kill points are drawn from a seeded generator; the seed is printed (and is in every
assertion message): ``FAULT_SEED=N pytest tests/test_fault_injection.py`` replays a run
of kills, and ``FAULT_KILLS=N`` changes their number.  The slow test kills 12 times for
one seed in the suite (about 40 s on two cores); ``FAULT_SEEDS=N`` runs it for N seeds.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from test_reliability import same_weights
from test_run_ownership import snapshot
from trainer_core import load_checkpoint

# The fault plugin, loaded through a real entry point in each run's process.  It prints
# every point of the run it passes ("at POINT"), and at the point $FAULT_AT names sends
# its own process $FAULT_SIGNAL.  Points: "train STEP" (on_batch_end, before the
# checkpoint plugin's mid-epoch save), "eval EPOCH BATCH", "metrics STEP" (appending the
# evaluation's record: a SIGKILL comes after half the line), "save STEP FILE" (inside
# the atomic write of a checkpoint file: a SIGKILL comes after $FAULT_PART of its bytes,
# before the rename), "saved STEP FILE" (after it, before the save's next file),
# "evict STEP FILE" (before an evicted best file is deleted) and "resume STEP" (a
# continued run, its config rewritten, before its metrics are cut back to its checkpoint).
FAULT = """
    import io
    import os
    import signal

    import trainer_core.checkpointing as checkpointing
    import trainer_core_plugins.checkpoint as checkpoint_plugin
    from trainer_core import hookimpl
    from trainer_core.rundir import RunDir

    class Fault:
        def __init__(self):
            self.target = os.environ.get("FAULT_AT")
            self.signum = getattr(signal, os.environ.get("FAULT_SIGNAL", "SIGKILL"))
            self.part = float(os.environ.get("FAULT_PART", "0.5"))
            self.trainer = None
            self.eval_batch = 0
            self._wrap()

        def hit(self, point):
            '''Announce ``point``; True when it is the target (a SIGKILL never returns).'''
            print("at " + point, flush=True)
            if self.target not in (point, point.split()[0]):  # (a kind alone: its first point)
                return False
            os.kill(os.getpid(), self.signum)
            return True

        def kill_now(self, point, cut):
            '''At the target ``point``: SIGKILL after ``cut()`` (a write cut short),
            or send the signal (SIGTERM) and let the code go on.'''
            print("at " + point, flush=True)
            if point != self.target:
                return
            if self.signum == signal.SIGKILL:
                cut()
            os.kill(os.getpid(), self.signum)

        def _wrap(self):
            fault = self
            real_write = checkpointing.atomic_write_with

            def write(path, writer):
                step = fault.trainer.state.step

                def cut_short(handle):
                    buffer = io.BytesIO()
                    writer(buffer)
                    data = buffer.getvalue()
                    fault.kill_now(f"save {step} {path.name}",
                                   lambda: (handle.write(data[: int(len(data) * fault.part)]), handle.flush()))
                    handle.write(data)

                real_write(path, cut_short)
                fault.hit(f"saved {step} {path.name}")

            checkpointing.atomic_write_with = write
            real_append = RunDir.append_metrics

            def append(run_dir, record):
                def half_line():
                    with open(run_dir.path / "metrics.jsonl", "a") as handle:
                        line = __import__("json").dumps(record)
                        handle.write(line[: len(line) // 2])
                fault.kill_now(f"metrics {record['step']}", half_line)
                real_append(run_dir, record)

            RunDir.append_metrics = append
            real_remove = checkpoint_plugin.remove_checkpoint

            def remove(path):
                fault.hit(f"evict {fault.trainer.state.step} {path.name}")
                real_remove(path)

            checkpoint_plugin.remove_checkpoint = remove
            real_continue = RunDir.continue_from

            def continue_from(run_dir, step):
                run_dir._release_held_back()
                fault.hit(f"resume {step}")
                real_continue(run_dir, step)

            RunDir.continue_from = continue_from

        @hookimpl
        def on_setup(self, trainer):
            self.trainer = trainer

        @hookimpl
        def on_batch_end(self, trainer):
            self.hit(f"train {trainer.state.step}")

        @hookimpl
        def on_eval_start(self):
            self.eval_batch = 0

        @hookimpl
        def on_eval_batch(self, trainer):
            self.eval_batch += 1
            self.hit(f"eval {trainer.state.epoch} {self.eval_batch}")
"""

# fake data: 48 training samples in batches of 8 (6 steps an epoch), 16 to evaluate (2 batches).
# lr 0.01 improves val/loss every epoch, so save_top_k=1 evicts the previous best file each time.
RUN = ["--dataset", "fake", "-o", "dataset.train_size=48", "-o", "dataset.val_size=16", "--model", "mlp",
       "-o", "model.hidden=16", "--device", "cpu", "--epochs", "3", "--batch-size", "8", "--lr", "0.01", "--log-every", "4",
       "-q", "--plugins", "checkpoint,steplr,fault", "-o", "steplr.step_size=1", "-o", "checkpoint.every_n_steps=4",
       "-o", "checkpoint.monitor=val/loss", "--run-dir", "run"]
SIGNALS = ("SIGKILL", "SIGTERM")


@pytest.fixture(scope="module")
def fault_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a subprocess that can load the ``fault`` test plugin."""
    from trainer_core.testing import write_fake_distribution

    folder = write_fake_distribution(tmp_path_factory.mktemp("site"), "fault-dist",
                                     {"trainer.plugins": {"fault": "fault_plugin:Fault"}}, modules={"fault_plugin": FAULT})
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAULT_")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(folder), env.get("PYTHONPATH", "")])}


def trainer_run(cwd: Path, env: dict[str, str], *args: str, **fault: str) -> tuple[int, list[str], str]:
    """One ``trainer run`` process; ``fault`` sets its FAULT_* variables.  Returns its exit
    status (negative: the signal that ended it), the points it passed, and its stderr."""
    extra = {f"FAULT_{k.upper()}": v for k, v in fault.items()}
    done = subprocess.run([sys.executable, "-m", "trainer_core", "run", *args], cwd=cwd, env={**env, **extra},
                          capture_output=True, text=True, timeout=300)
    points = [line[3:] for line in done.stdout.splitlines() if line.startswith("at ")]
    return done.returncode, points, done.stderr


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, fault_env: dict[str, str]) -> dict[str, Any]:
    """The run never stopped: its files and the points it passed, in order."""
    cwd = tmp_path_factory.mktemp("straight")
    code, points, err = trainer_run(cwd, fault_env, *RUN)
    assert code == 0, err
    return {"run": cwd / "run", "files": snapshot(cwd / "run"), "points": points}


@dataclass
class Chain:
    """A run killed at a planned series of points and continued after each kill."""

    seed: int
    kills: int
    log: list[str] = field(default_factory=list)

    def why(self) -> str:
        return f"FAULT_SEED={self.seed} FAULT_KILLS={self.kills}: " + "; ".join(self.log)


def kill_and_resume(cwd: Path, env: dict[str, str], points: list[str], seed: int, kills: int) -> Chain:
    """Start the run, kill it at ``kills`` random points of ``points`` (those of a straight
    run, in order), continue it with ``--resume auto`` after each, until it completes."""
    rng = random.Random(seed)
    chain = Chain(seed, kills)
    # Kill points of as many kinds as there are kills, random within each kind, in the straight
    # run's order; each process is killed at the first one past what the processes before it
    # reached (a SIGTERM'd one goes on to save and stop).  Half the kills are SIGKILLs.
    kinds = sorted({point.split()[0] for point in points})
    rng.shuffle(kinds)
    plan = sorted({rng.choice([i for i, p in enumerate(points) if p.split()[0] == kinds[n % len(kinds)]]) for n in range(kills)})
    signals = [SIGNALS[n % 2] for n in range(len(plan))]
    rng.shuffle(signals)
    order = {point: index for index, point in enumerate(points)}
    reached, killed_resuming = -1, False
    for _ in range(kills + 3):
        target = next((i for i in plan if i > reached), None)
        fault: dict[str, str] = {}
        if target is not None:
            fault = {"at": points[target], "signal": signals[plan.index(target)], "part": str(rng.choice([0, 0.5, 1]))}
        elif reached >= 0 and not killed_resuming and rng.random() < 0.5:  # sometimes, once: kill a continued run as it starts
            fault, killed_resuming = {"at": "resume", "signal": rng.choice(SIGNALS)}, True
        # What a scheduler's requeue runs: the same command, with --resume auto.
        code, passed, err = trainer_run(cwd, env, *RUN, "--resume", "auto", **fault)
        chain.log.append(f"{fault.get('at', 'no kill')} {fault.get('signal', '')} part={fault.get('part', '-')} -> exit {code}")
        if not any(fault.get("at") in (p, p.split()[0]) for p in passed):
            # No kill (or a run that started afresh, as one killed before its first save does: no "resume" point).
            assert code == 0 and fault.get("at") in (None, "resume"), f"{err}\n{chain.why()}"
            return chain
        expected = {"SIGKILL": -signal.SIGKILL, "SIGTERM": 128 + signal.SIGTERM}[fault["signal"]]
        assert code == expected, f"{err}\n{chain.why()}"
        reached = max([reached, *(order[p] for p in passed if p in order)])
    raise AssertionError(f"the run did not complete: {chain.why()}")


def assert_same_run(straight: dict[str, Any], run: Path, why: str) -> None:
    """``run`` ended as the straight run did, bit for bit, with the same files and nothing else."""
    got, want = snapshot(run), straight["files"]
    assert sorted(got) == sorted(want), why  # no temporary file, orphan best checkpoint or lock left
    assert got["metrics.jsonl"] == want["metrics.jsonl"], why
    # Compared as text: a continued run may write an option typed (16) that the first run wrote as given ("16").
    assert as_text(tomllib.loads(got["config.toml"].decode())) == as_text(tomllib.loads(want["config.toml"].decode())), why
    for name in (n for n in want if n.startswith("checkpoints/")):
        a, b = load_checkpoint(run / name), load_checkpoint(straight["run"] / name)
        assert same_weights(a["model"], b["model"]), (name, why)
        assert untimed(a["state"]) == untimed(b["state"]), (name, why)
        assert a["plugins"] == b["plugins"] and a["stepper"] == b["stepper"], (name, why)
        assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"], (name, why)
        for key, state in b["optimizer"]["state"].items():
            assert all(torch.equal(v, a["optimizer"]["state"][key][f]) for f, v in state.items()), (name, key, why)
    summary, reference = json.loads(got["summary.json"]), json.loads(want["summary.json"])
    assert summary["status"] == "completed", why
    same = ("final", "best", "epochs", "steps")
    assert {k: summary[k] for k in same} == {k: reference[k] for k in same}, why


def untimed(state: dict[str, Any]) -> dict[str, Any]:
    """Progress without the clock readings (when it started, seconds spent)."""
    return {k: v for k, v in state.items() if k != "started_at" and not k.endswith("seconds")}


def as_text(value: Any) -> Any:
    return {k: as_text(v) for k, v in value.items()} if isinstance(value, dict) else str(value)


def seed_for(default: int) -> int:
    seed = int(os.environ.get("FAULT_SEED", default))
    print(f"fault injection seed: FAULT_SEED={seed}")
    return seed


def test_the_straight_run_passes_every_kind_of_point(straight: dict[str, Any]) -> None:
    """The points kills are drawn from cover training, evaluation, metrics, saves of both kinds and evictions."""
    kinds = {point.split()[0] for point in straight["points"]}
    assert kinds == {"train", "eval", "metrics", "save", "saved", "evict"}
    assert any(p.startswith("save ") and "best-epoch" in p for p in straight["points"])
    assert [p for p in straight["points"] if p.startswith("train ")] == [f"train {s}" for s in range(1, 19)]


def test_a_run_killed_at_random_points_and_resumed_each_time_ends_bit_identical(
    tmp_path: Path, fault_env: dict[str, str], straight: dict[str, Any]
) -> None:
    seed = seed_for(14)
    chain = kill_and_resume(tmp_path, fault_env, straight["points"], seed, int(os.environ.get("FAULT_KILLS", 4)))
    print("\n".join(chain.log))
    assert_same_run(straight, tmp_path / "run", chain.why())


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(int(os.environ.get("FAULT_SEEDS", 1))))
def test_many_kills_at_random_points(tmp_path: Path, fault_env: dict[str, str], straight: dict[str, Any], seed: int) -> None:
    seed = seed_for(1000 + seed)
    chain = kill_and_resume(tmp_path, fault_env, straight["points"], seed, 12)
    print("\n".join(chain.log))
    assert_same_run(straight, tmp_path / "run", chain.why())
