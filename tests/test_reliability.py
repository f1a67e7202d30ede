"""Reliability and safety: a run survives a SIGKILL, a kill during a save, a full
disk, a signal, a NaN and a failing plugin without losing what it had, and no
file it loads can run code.  Real subprocesses, real files, real signals."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer_core_plugins.checkpoint import Checkpoint
from trainer_core_plugins.steplr import StepLR
from trainer_core import RunConfig, Trainer, UsageError, hookimpl, load_checkpoint
from trainer_core.checkpointing import find_checkpoint
from trainer_core.rundir import RunDir
from trainer_core.runtime import seed_everything
from trainer_core.testing import tiny_data, tiny_model


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- in process: a signal during evaluation ---------------------------------------------


def fit_tiny(run_dir: Path, extra: dict[str, object], resume: bool = False) -> Trainer:
    """A 3-epoch tiny run (3 steps per epoch) with steplr and checkpoint, fresh or resumed."""
    config = RunConfig(epochs=3, batch_size=16, lr=0.05, device="cpu", plugins={}, model="tiny", dataset="tiny")
    seed_everything(config.seed)
    payload = load_checkpoint(find_checkpoint(run_dir)) if resume else None
    plugins = {"checkpoint": Checkpoint(restore_best=False), "steplr": StepLR(step_size=1, gamma=0.5), **extra}
    trainer = Trainer(tiny_model(), tiny_data(), config, plugins=plugins,
                      run_dir=RunDir.create(run_dir, resume=resume, overwrite=not resume), resume=payload)
    trainer.fit()
    return trainer


class SignalDuringEval:
    """Sends this process SIGTERM from inside epoch 2's evaluation."""

    @hookimpl
    def on_eval_batch(self, trainer: Trainer) -> None:
        if trainer.state.epoch == 2:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_during_evaluation_is_honoured_and_the_epoch_is_evaluated_on_resume(tmp_path: Path) -> None:
    reference = fit_tiny(tmp_path / "straight", {})
    stopped = fit_tiny(tmp_path / "run", {"signal": SignalDuringEval()})
    assert stopped.signals.exit_code == 143 and stopped.state.stop_reason == "received SIGTERM"
    # The evaluation was cut short: nothing recorded for epoch 2, but its training is kept.
    assert [m["epoch"] for m in stopped.state.history] == [1]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["state"]["step"] == 6
    resumed = fit_tiny(tmp_path / "run", {}, resume=True)
    # The resumed run evaluates epoch 2 and runs its epoch-end hooks (steplr's step) before epoch 3.
    assert same_weights(reference.model.state_dict(), resumed.model.state_dict())
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == (tmp_path / "straight" / "metrics.jsonl").read_text()


# -- real `trainer run` processes ---------------------------------------------------------

PACE = """
    import io
    import json
    import os
    import time

    from trainer_core import hookimpl

    def pause(trainer, what, until_stop=True):
        '''Announce ``what`` and wait (up to a minute) for a kill, a signal's stop
        request, or the file $PACE_RELEASE.'''
        print(what, flush=True)
        deadline = time.monotonic() + 60
        release = os.environ.get("PACE_RELEASE")
        while not (until_stop and trainer.state.should_stop) and time.monotonic() < deadline:
            if release and os.path.exists(release):
                return
            time.sleep(0.02)

    class Pace:
        '''Reports progress on stdout and, as the environment asks, pauses
        where the test sends a signal or a SIGKILL.'''

        @hookimpl
        def on_fit_start(self, trainer):
            hang_at = int(os.environ.get("PACE_HANG_SAVE_AT", -1))
            if hang_at < 0:
                return
            import trainer_core.checkpointing as checkpointing
            real = checkpointing.atomic_write_with

            def half_then_hang(path, write):
                if trainer.state.step != hang_at:
                    return real(path, write)

                def half(handle):
                    # The real temporary file gets half the checkpoint, then the process hangs mid-write.
                    buffer = io.BytesIO()
                    write(buffer)
                    handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                    handle.flush()
                    pause(trainer, f"saving {path.name} at step {hang_at}", until_stop=False)

                return real(path, half)

            checkpointing.atomic_write_with = half_then_hang

        @hookimpl
        def on_batch_start(self, trainer):
            # Every hook of the steps before, the checkpoint plugin's saves included, has run.
            step = trainer.state.step
            if step == int(os.environ.get("PACE_PAUSE_AT", -1)):
                pause(trainer, f"paused after step {step}")

        @hookimpl
        def on_train_log(self, trainer, metrics):
            print("log " + json.dumps({"step": trainer.state.step, **metrics}), flush=True)

        @hookimpl
        def on_fit_end(self, trainer):
            print(f"fit end: {trainer.state.stop_reason}", flush=True)
"""

EPOCHS, BATCHES, LOG_EVERY, EVERY_N_STEPS = 3, 12, 5, 4  # fake's 96 training samples in batches of 8
RUN = ["--dataset", "fake", "--device", "cpu", "--epochs", str(EPOCHS), "--batch-size", "8", "--log-every", str(LOG_EVERY),
       "-q", "--plugins", "checkpoint,steplr,pace", "-o", "steplr.step_size=1", "-o", "model.width=4",
       "-o", f"checkpoint.every_n_steps={EVERY_N_STEPS}"]


@pytest.fixture(scope="module")
def pace_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a subprocess that can load the ``pace`` test plugin."""
    from trainer_core.testing import write_fake_distribution

    folder = write_fake_distribution(tmp_path_factory.mktemp("site"), "pace-dist", {"trainer.plugins": {"pace": "pace_plugin:Pace"}},
                                     modules={"pace_plugin": PACE})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACE_")}
    # One thread each: these small runs go no faster with more, and CI's cores are shared.
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(folder), env.get("PYTHONPATH", "")])}


def start(cwd: Path, env: dict[str, str], *args: str, **pace: Any) -> subprocess.Popen[str]:
    """``trainer run`` in a subprocess; ``pace`` sets the plugin's PACE_* variables."""
    extra = {f"PACE_{k.upper()}": str(v) for k, v in pace.items()}
    return subprocess.Popen([sys.executable, "-m", "trainer_core", "run", *args], cwd=cwd, env={**env, **extra},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen[str], line: str) -> list[str]:
    """Read stdout up to ``line``; return what came before it."""
    assert proc.stdout is not None
    seen = []
    while (got := proc.stdout.readline()) != "":
        if got.strip() == line:
            return seen
        seen.append(got.strip())
    proc.wait()
    raise AssertionError(f"the run ended (exit {proc.returncode}) before printing {line!r}: {proc.stderr.read()}")  # type: ignore[union-attr]


def finish(proc: subprocess.Popen[str], code: int = 0) -> str:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == code, err
    return out


def train_logs(stdout: str) -> list[dict[str, float]]:
    return [json.loads(line[4:]) for line in stdout.splitlines() if line.startswith("log ")]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, pace_env: dict[str, str]) -> dict[str, Any]:
    """The uninterrupted run: final checkpoint, metrics.jsonl and training logs."""
    cwd = tmp_path_factory.mktemp("straight")
    out = finish(start(cwd, pace_env, *RUN, "--run-dir", "run"))
    return {"last": load_checkpoint(cwd / "run" / "checkpoints" / "last.pt"), "logs": train_logs(out),
            "metrics": (cwd / "run" / "metrics.jsonl").read_text(), "best": sorted(p.name for p in (cwd / "run" / "checkpoints").iterdir())}


def assert_resumed_exactly(straight: dict[str, Any], run: Path, resumed_from: int, logs: list[dict[str, float]], why: str) -> None:
    """The resumed run ended where the straight one did, bit for bit, and logged what it logged from ``resumed_from`` on."""
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (last["state"]["epoch"], last["state"]["step"]) == (EPOCHS, EPOCHS * BATCHES), why
    assert same_weights(last["model"], straight["last"]["model"]), why
    for key, state in straight["last"]["optimizer"]["state"].items():
        assert all(torch.equal(v, last["optimizer"]["state"][key][f]) for f, v in state.items()), why
    assert last["plugins"]["steplr"] == straight["last"]["plugins"]["steplr"], why
    assert (run / "metrics.jsonl").read_text() == straight["metrics"], why
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")) == straight["best"], why
    # Saved mid-epoch at a logging step, before its log: the resumed run emits that log again.
    batch = resumed_from % BATCHES
    replayed = resumed_from if batch and batch % LOG_EVERY == 0 else None
    assert logs == [entry for entry in straight["logs"] if entry["step"] > resumed_from or entry["step"] == replayed], why


@pytest.mark.slow
@pytest.mark.parametrize("every_n_steps", [EVERY_N_STEPS, 0], ids=["mid-epoch", "epoch-boundary"])
def test_sigkill_then_resume_auto_is_bit_identical(tmp_path: Path, pace_env: dict[str, str], straight: dict[str, Any],
                                                   every_n_steps: int) -> None:
    import random

    # Saves: every N steps within an epoch, and each epoch's end (after its evaluation).
    saves = [s for s in range(1, EPOCHS * BATCHES + 1) if s % BATCHES == 0 or (every_n_steps and s % every_n_steps == 0)]
    # A random step of epochs 2-3 that is no save step, so the kill loses work; the seed keeps it reproducible.
    kill_after = random.Random(every_n_steps).choice([s for s in range(BATCHES + 1, EPOCHS * BATCHES) if s not in saves])
    saved = max(s for s in saves if s <= kill_after)
    why = f"killed after step {kill_after} (every_n_steps={every_n_steps}), expected a resume from step {saved}"
    run = RUN + ["-o", f"checkpoint.every_n_steps={every_n_steps}", "--run-dir", "run"]
    proc = start(tmp_path, pace_env, *run, pause_at=kill_after)
    before = wait_for(proc, f"paused after step {kill_after}")
    proc.kill()
    proc.wait()
    assert train_logs("\n".join(before)) == [e for e in straight["logs"] if e["step"] <= kill_after], why
    assert load_checkpoint(find_checkpoint(tmp_path / "run"))["state"]["step"] == saved, why
    with open(tmp_path / "run" / "metrics.jsonl", "a") as metrics:
        metrics.write('{"epoch": 3, "st')  # as a kill in the middle of appending a record would leave it
    resumed = finish(start(tmp_path, pace_env, "--run-dir", "run", "--resume", "auto", "-q"))
    assert_resumed_exactly(straight, tmp_path / "run", saved, train_logs(resumed), why)


@pytest.mark.slow
def test_a_kill_during_a_save_keeps_the_previous_checkpoint_for_resume_auto(
    tmp_path: Path, pace_env: dict[str, str], straight: dict[str, Any]
) -> None:
    hang_at = BATCHES + 2 * EVERY_N_STEPS  # a mid-epoch save in epoch 2
    proc = start(tmp_path, pace_env, *RUN, "--run-dir", "run", hang_save_at=hang_at)
    wait_for(proc, f"saving last.pt at step {hang_at}")
    proc.kill()
    proc.wait()
    folder = tmp_path / "run" / "checkpoints"
    (partial,) = [p for p in folder.iterdir() if p.name.startswith(".last.pt.")]  # the save was killed half-way
    with pytest.raises(UsageError, match="is damaged or not a checkpoint"):
        load_checkpoint(partial)
    assert find_checkpoint(tmp_path / "run") == folder / "last.pt"
    assert load_checkpoint(folder / "last.pt")["state"]["step"] == hang_at - EVERY_N_STEPS
    resumed = finish(start(tmp_path, pace_env, "--run-dir", "run", "--resume", "auto", "-q"))
    assert_resumed_exactly(straight, tmp_path / "run", hang_at - EVERY_N_STEPS, train_logs(resumed), "killed mid-save")
    assert not partial.exists()  # the resumed run, holding the folder's lock, removed it


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_runs_end_hooks_exits_143_and_resumes_exactly(
    tmp_path: Path, pace_env: dict[str, str], straight: dict[str, Any]
) -> None:
    signalled_after = BATCHES + 5  # step 18 is no checkpoint step: only the signal's save holds it
    proc = start(tmp_path, pace_env, *RUN, "--run-dir", "run", pause_at=signalled_after)
    wait_for(proc, f"paused after step {signalled_after}")
    proc.send_signal(signal.SIGTERM)
    out = finish(proc, 143)
    assert "fit end: received SIGTERM" in out
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["state"]["step"] == signalled_after + 1  # the step under way when the signal came was finished
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["status"], summary["stop_reason"]) == ("stopped", "received SIGTERM")
    resumed = finish(start(tmp_path, pace_env, "--run-dir", "run", "--resume", "auto", "-q"))
    assert_resumed_exactly(straight, tmp_path / "run", signalled_after + 1, train_logs(resumed), "stopped by SIGTERM")


@pytest.mark.slow
def test_a_second_sigint_during_the_final_save_stops_at_once(tmp_path: Path, pace_env: dict[str, str]) -> None:
    first_after = BATCHES + 2
    proc = start(tmp_path, pace_env, *RUN, "--run-dir", "run", pause_at=first_after, hang_save_at=first_after + 1)
    wait_for(proc, f"paused after step {first_after}")
    proc.send_signal(signal.SIGINT)
    wait_for(proc, f"saving last.pt at step {first_after + 1}")  # the first signal's save, hanging
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (130, "interrupted\n")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "interrupted"
    folder = tmp_path / "run" / "checkpoints"
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # the cut save left no temporary file
    assert load_checkpoint(folder / "last.pt")["state"]["step"] == BATCHES  # the previous save, intact


# -- a full disk, an unwritable folder -------------------------------------------------------

SMALL = ["run", "--dataset", "fake", "--device", "cpu", "--batch-size", "8", "-q", "--plugins", "checkpoint",
         "-o", "model.width=4"]  # checkpoints of about 230 kB


def cli(*args: str | Path) -> tuple[int, str]:
    from click.testing import CliRunner

    from trainer_core.cli import make_cli

    result = CliRunner().invoke(make_cli(), [str(a) for a in args])
    return result.exit_code, result.output


def one_line(output: str) -> str:
    assert output.count("\n") == 1 and output.startswith("error: "), output
    return output.strip()


@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real 1 MiB filesystem (tmpfs) at ``tmp_path/disk``; needs root (mount)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here; the file-size-limit test covers a failing write")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the file-size-limit test covers a failing write")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def fill(disk: Path, leave: int) -> None:
    """Take the free space of ``disk`` down to about ``leave`` bytes."""
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    stat = os.statvfs(disk)
    filler.write_bytes(bytes(max(stat.f_bavail * stat.f_frsize - leave, 0)))


def test_a_full_disk_is_a_clear_error_and_keeps_the_last_good_checkpoint(small_disk: Path) -> None:
    run = small_disk / "run"
    assert cli(*SMALL, "--epochs", "1", "--run-dir", run)[0] == 0
    good = load_checkpoint(run / "checkpoints" / "last.pt")
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())  # last.pt and epoch 1's best
    # Room for the metrics line and the summary, not for a checkpoint: the save fails half-way.
    fill(small_disk, leave=64 * 1024)
    code, output = cli("run", "--run-dir", run, "--resume", "auto", "--epochs", "2", "-q")
    assert code == 1
    assert re.fullmatch(rf"error: cannot write checkpoint {re.escape(str(run / 'checkpoints'))}/(best-epoch002-\S+|last)\.pt: "
                        "No space left on device; the previous checkpoints are intact", one_line(output))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == saved
    assert same_weights(load_checkpoint(run / "checkpoints" / "last.pt")["model"], good["model"])
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"
    # No room at all: refused before training, and no lock is left behind to block the folder.
    fill(small_disk, leave=0)
    code, output = cli("run", "--run-dir", run, "--resume", "auto", "--epochs", "2", "-q")
    assert (code, one_line(output)) == (2, f"error: cannot write to run folder {run}: No space left on device")
    assert not (run / ".lock").exists()
    # Space freed: the run continues from its last good checkpoint.
    (small_disk / "filler").unlink()
    assert cli("run", "--run-dir", run, "--resume", "auto", "--epochs", "2", "-q")[0] == 0
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_read_only_run_folder_is_a_clear_error(small_disk: Path) -> None:
    run = small_disk / "run"
    assert cli(*SMALL, "--epochs", "1", "--run-dir", run)[0] == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    code, output = cli("run", "--run-dir", run, "--resume", "auto", "--epochs", "2", "-q")
    assert (code, one_line(output)) == (2, f"error: cannot write to run folder {run}: Read-only file system")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def limit_file_size() -> None:
    """In the child: writes past 100 kB fail with EFBIG (instead of a SIGXFSZ kill); any user may set this."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


@pytest.mark.slow
def test_a_write_that_fails_mid_checkpoint_keeps_the_last_good_one(tmp_path: Path) -> None:
    """Without root: a file-size limit makes the checkpoint write fail part-way, as a full disk does."""
    assert cli(*SMALL, "--epochs", "1", "--run-dir", tmp_path / "run")[0] == 0
    good = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    failed = subprocess.run([sys.executable, "-m", "trainer_core", "run", "--run-dir", "run", "--resume", "auto", "--epochs", "2",
                             "-q"], cwd=tmp_path, capture_output=True, text=True, timeout=180, preexec_fn=limit_file_size,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert failed.returncode == 1
    assert one_line(failed.stderr).endswith(": File too large; the previous checkpoints are intact")
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == saved  # no partial file
    assert same_weights(load_checkpoint(folder / "last.pt")["model"], good["model"])


# -- non-finite losses with checkpoints on ---------------------------------------------------


class PoisonStep:
    """Makes the batch of training step ``step`` NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def on_batch_start(self, trainer: Trainer, inputs: torch.Tensor) -> None:
        if trainer.state.step + 1 == self.step:
            inputs.fill_(float("nan"))


def finite(payload: dict[str, Any]) -> bool:
    return all(torch.isfinite(t).all() for t in payload["model"].values() if t.is_floating_point())


def test_a_nan_stops_the_run_and_no_nan_checkpoint_replaces_a_good_one(tmp_path: Path) -> None:
    from trainer_core import TrainerError
    from trainer_core.testing import run_tiny

    # A save after every step, and the loss read back only every 3 steps: steps 5 and 6 have NaN
    # weights before the loop can know; the checkpoint plugin must refuse them itself.
    plugins = {"checkpoint": Checkpoint(every_n_steps=1, restore_best=False), "poison": PoisonStep(5)}
    with pytest.raises(TrainerError, match=r"^training loss became nan in epoch 2 by step 6; lower the learning rate"):
        run_tiny(plugins, epochs=3, log_every_n_steps=3, run_dir=tmp_path / "run")
    folder = tmp_path / "run" / "checkpoints"
    (best,) = [p for p in folder.iterdir() if p.name != "last.pt"]
    assert best.name.startswith("best-epoch001-") and finite(load_checkpoint(best))
    last = load_checkpoint(folder / "last.pt")
    assert last["state"]["step"] == 4 and finite(last)  # the last step before the NaN
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "by step 6" in summary["error"]


def test_skipping_non_finite_steps_with_checkpoints_on(tmp_path: Path) -> None:
    from trainer_core.testing import run_tiny

    plugins = {"checkpoint": Checkpoint(every_n_steps=1, save_top_k=-1, restore_best=False), "poison": PoisonStep(5)}
    trainer = run_tiny(plugins, epochs=3, nonfinite="skip", run_dir=tmp_path / "run")
    files = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert len(files) == 4 and all(finite(load_checkpoint(p)) for p in files)  # 3 best (all kept) and last
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["state"]["step"] == 9 and last["stepper"]["skipped"] == 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_steps"] == 1
    assert trainer.state.metrics["val/acc"] >= 0.9


# -- a plugin that fails ---------------------------------------------------------------------


class FailsInEval:
    @hookimpl
    def on_eval(self, trainer: Trainer) -> None:
        if trainer.state.epoch == 2:
            raise KeyError("val/f1")


class Witness:
    """Records the exception every plugin is told about."""

    def __init__(self) -> None:
        self.told: list[BaseException] = []

    @hookimpl
    def on_exception(self, exception: BaseException) -> None:
        self.told.append(exception)


def test_a_failing_plugin_is_named_others_are_told_and_the_last_checkpoint_stays(tmp_path: Path) -> None:
    """On a plugin's failure the checkpoint plugin does not save: the state may be part-way
    through a step or an epoch's end.  The last periodic checkpoint is what a resume continues."""
    from trainer_core import PluginError
    from trainer_core.testing import run_tiny

    witness = Witness()
    with pytest.raises(PluginError, match=r"^plugin 'faulty' failed in on_eval: KeyError: 'val/f1'$"):
        run_tiny({"checkpoint": Checkpoint(every_n_steps=2), "faulty": FailsInEval(), "witness": witness}, epochs=3,
                 run_dir=tmp_path / "run")
    assert [type(e) for e in witness.told] == [KeyError]
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (last["state"]["epoch"], last["state"]["step"]) == (2, 4)  # the mid-epoch save before the failure
    assert not (tmp_path / "run" / ".lock").exists()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


BROKEN_PLUGINS = {
    "import": ("import not_a_module_anywhere\n", "plugin 'broken' failed to import"),
    "spec": ("from trainer_core import hookimpl\n\nclass Broken:\n    @hookimpl\n    def on_bach_end(self, trainer):\n        pass\n",
             "plugin 'broken' (entry point 'broken = broken_plugin:Broken' of distribution 'broken-dist') implements "
             "unknown hook 'on_bach_end' (did you mean 'on_batch_end'?)"),
    "arguments": ("from trainer_core import hookimpl\n\nclass Broken:\n    @hookimpl\n    def on_eval(self, metrics, confusion):\n"
                  "        pass\n", "hook on_eval() asks for confusion, which the spec does not pass"),
}


@pytest.mark.parametrize("kind", BROKEN_PLUGINS)
def test_a_broken_plugin_is_refused_before_anything_is_written(fake_entry_points, tmp_path: Path, kind: str) -> None:
    source, message = BROKEN_PLUGINS[kind]
    fake_entry_points("broken-dist", {"trainer.plugins": {"broken": "broken_plugin:Broken"}}, modules={"broken_plugin": source})
    code, output = cli("run", "--dataset", "fake", "--plugins", "broken", "--run-dir", tmp_path / "run")
    assert code == 1 and message in one_line(output)
    assert not (tmp_path / "run").exists()


# -- files that would run code when loaded ---------------------------------------------------


class RunsACommand:
    """Unpickles as a call of ``os.system``: what a booby-trapped checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch '{self.marker}'",)


def booby_trapped(path: Path, marker: Path) -> Path:
    """A checkpoint that looks right (model, state, config) and runs a command when unpickled."""
    weights = tiny_model(num_classes=10).state_dict()
    torch.save({"format": 1, "model": {**weights, "trap": RunsACommand(marker)}, "state": {"epoch": 1, "step": 1},
                "config": {"model": "mlp", "dataset": "fake"}}, path)
    return path


def test_a_checkpoint_that_runs_code_is_refused_everywhere(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    # First show the trap is live: an unsafe load runs the command.
    control = booby_trapped(tmp_path / "control.pt", tmp_path / "control-ran")
    torch.load(control, weights_only=False)
    assert (tmp_path / "control-ran").exists()

    evil = booby_trapped(tmp_path / "evil.pt", marker)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    booby_trapped(tmp_path / "run" / "checkpoints" / "last.pt", marker)
    refused = "was refused: it holds objects other than tensors and plain data, and loading it could run code"
    for args in (["run", "--resume", evil],
                 ["run", "--run-dir", tmp_path / "run", "--resume", "auto"],
                 ["run", "--dataset", "fake", "--model", "mlp", "-o", f"model.weights={evil}", "--run-dir", tmp_path / "new"],
                 ["eval", "--checkpoint", evil],
                 ["predict", "--checkpoint", evil, tmp_path / "any.png"],
                 ["export", "--checkpoint", evil, "--format", "torchscript", "--output", tmp_path / "model.pt"]):
        code, output = cli(*args)
        assert code == 2 and refused in one_line(output), args
        assert not marker.exists(), args
    assert not (tmp_path / "new").exists()


# -- bad input: one line each, exit status 2 --------------------------------------------------


def write_files(tmp_path: Path, kind: str) -> list[str]:
    """Write the bad input ``kind`` under ``tmp_path``; return the extra command-line arguments."""
    from test_datasets import write_cifar, write_idx_dataset, write_image_tree

    data = tmp_path / "data"
    if kind == "bad-toml":
        (tmp_path / "run.toml").write_text("epochs = [\n")
        return ["--config", str(tmp_path / "run.toml")]
    if kind == "unknown-key":
        (tmp_path / "run.toml").write_text("epoch = 3\n")
        return ["--config", str(tmp_path / "run.toml")]
    if kind == "empty-root":
        data.mkdir()
        return ["--dataset", "mnist", "--data-root", str(data)]
    if kind == "truncated-idx":
        write_idx_dataset(data, gz=False)
        images = data / "t10k-images-idx3-ubyte"
        images.write_bytes(images.read_bytes()[:1000])
        return ["--dataset", "mnist", "--data-root", str(data), "--model", "mlp"]
    if kind == "truncated-pickle":
        write_cifar(data)
        batch = data / "cifar-10-batches-py" / "data_batch_2"
        batch.write_bytes(batch.read_bytes()[:300])
        return ["--dataset", "cifar10", "--data-root", str(data)]
    if kind == "unreadable-image":
        write_image_tree(data, per_class=2)
        (data / "val" / "bees" / "1.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
        return ["--dataset", "imagefolder", "--data-root", str(data), "-o", "dataset.image_size=16", "--model", "mlp",
                "--num-workers", "1"]  # the error crosses a loader process and is still one line
    raise AssertionError(kind)


BAD_INPUT = [
    (["--optimizer", "lbfgs"], "Invalid value for '--optimizer': 'lbfgs' is not one of 'sgd', 'adam', 'adamw'. (see 'cli run --help')"),
    (["--precision", "8"], "Invalid value for '--precision': '8' is not one of '32', 'bf16', '16'."),
    (["--batch-size", "eight"], "Invalid value for '--batch-size': 'eight' is not a valid integer."),
    (["--epochs", "0"], "epochs must be >= 1 (got 0)"),
    (["--batch-size", "0"], "batch_size must be >= 1 (got 0)"),
    (["--lr", "0"], "lr must be > 0 (got 0.0)"),
    (["--epoch", "3"], "No such option '--epoch'"),
    (["--plugins", "chekpoint"], "unknown plugin 'chekpoint' (did you mean 'checkpoint'?); installed plugins: "),
    (["--plugins", "checkpoint", "-o", "checkpoint.monitr=val/loss"], "unknown option 'checkpoint.monitr' (did you mean 'monitor'?)"),
    (["--plugins", "checkpoint", "-o", "checkpoint.every_n_steps=-1"], "checkpoint.every_n_steps must be >= 0"),
    (["--plugins", "steplr", "-o", "steplr.gamma=nan"], "steplr.gamma must be > 0 (got nan)"),
    (["-o", "steplr.gamma=0.5"], "option 'steplr.gamma' is for plugin 'steplr', which is not enabled; add --plugins steplr"),
    ("bad-toml", "is not valid TOML"),
    ("unknown-key", "unknown setting 'epoch' in config file"),
    (["--config", "missing.toml"], "config file missing.toml does not exist"),
    ("empty-root", "mnist data not found: expected train-images-idx3-ubyte"),
    ("truncated-idx", "t10k-images-idx3-ubyte is truncated or damaged"),
    ("truncated-pickle", "data_batch_2 is damaged or not a CIFAR-10 batch"),
    ("unreadable-image", "bees/1.jpg (UnidentifiedImageError); replace or remove it"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT, ids=[a if isinstance(a, str) else " ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str] | str, message: str) -> None:
    extra = write_files(tmp_path, args) if isinstance(args, str) else args
    code, output = cli("run", "--dataset", "fake", "--epochs", "1", "-q", "--run-dir", tmp_path / "run", *extra)
    assert code == 2 and message in one_line(output)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_command_line_mistakes_outside_run_are_one_line_too() -> None:
    code, output = cli("rnu")
    assert (code, one_line(output)) == (2, "error: No such command 'rnu'. Did you mean 'run'? (see 'cli --help')")
    code, output = cli("predict", "--checkpoint", "x.pt")
    assert (code, one_line(output)) == (2, "error: Missing argument 'INPUTS...'. (see 'cli predict --help')")


@pytest.fixture(scope="module")
def fake_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.pt of a 1-epoch smallcnn run on fake's 3 classes."""
    run = tmp_path_factory.mktemp("fake-run") / "run"
    assert cli(*SMALL, "--epochs", "1", "--run-dir", run)[0] == 0
    return run / "checkpoints" / "last.pt"


@pytest.mark.slow
def test_a_checkpoint_for_another_class_count_names_the_keys_and_the_transfer_option(tmp_path: Path) -> None:
    mlp = ["--dataset", "fake", "--model", "mlp", "-o", "model.hidden=8", "--epochs", "1", "-q", "--plugins", "checkpoint"]
    assert cli("run", *mlp, "--run-dir", tmp_path / "three")[0] == 0
    checkpoint = tmp_path / "three" / "checkpoints" / "last.pt"
    before = {p: p.read_bytes() for p in (tmp_path / "three").rglob("*") if p.is_file()}
    code, output = cli("run", "--resume", checkpoint, "-o", "dataset.num_classes=5", "-q")  # into its own run folder
    line = one_line(output)
    assert code == 2 and line.startswith("error: checkpoint does not fit this model (shape in checkpoint vs model: ")
    assert "(3, 8) vs (5, 8)" in line and "-o model.weights=PATH" in line
    assert {p: p.read_bytes() for p in (tmp_path / "three").rglob("*") if p.is_file()} == before  # refused before touching it
    # What it suggests works: the layers that fit are loaded, the new head starts fresh.
    code, output = cli("run", *mlp, "-o", "dataset.num_classes=5", "-o", f"model.weights={checkpoint}", "--run-dir", tmp_path / "five")
    assert code == 0, output


def test_weights_of_another_model_are_refused(tmp_path: Path, fake_checkpoint: Path) -> None:
    code, output = cli("run", "--dataset", "fake", "--model", "mlp", "-o", f"model.weights={fake_checkpoint}", "--epochs", "1",
                       "-q", "--run-dir", tmp_path / "run")
    assert code == 2 and f"no weights in {fake_checkpoint} fit this model" in one_line(output)
    assert "was it saved from another model?" in output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_runs_on_one_run_folder_at_once_one_refuses_and_nothing_is_corrupted(tmp_path: Path, pace_env: dict[str, str]) -> None:
    # Both ask to overwrite, so only the folder's lock can keep them apart.  The one that takes it
    # waits after step 2 until the other has been refused.
    procs = [start(tmp_path, pace_env, *RUN, "--run-dir", "run", "--overwrite", pause_at=2, release=tmp_path / "go")
             for _ in range(2)]
    while all(p.poll() is None for p in procs):  # bounded: the winner waits at most a minute
        time.sleep(0.05)
    (loser,) = [p for p in procs if p.poll() is not None]
    (tmp_path / "go").touch()
    (winner,) = [p for p in procs if p is not loser]
    _, err = loser.communicate()
    run = tmp_path / "run"
    assert loser.returncode == 2
    assert re.fullmatch(rf"error: run folder run is in use by another run \(process {winner.pid} on \S+\); "
                        "wait for it to end or choose another --name", one_line(err))
    finish(winner)
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] == EPOCHS * BATCHES
    assert not (run / ".lock").exists()


# -- -o parsing never crashes ----------------------------------------------------------------

OWNERS = ["steplr", "checkpoint", "progress", "model", "dataset", "nope", "", " steplr"]
KEYS = ["gamma", "step_size", "interval", "monitor", "mode", "save_top_k", "every_n_steps", "restore_best", "dirpath", "bar",
        "refresh_per_second", "width", "dropout", "num_classes", "noise", ""]


@pytest.mark.slow
def test_any_option_text_is_accepted_or_one_usage_error() -> None:
    """``-o`` text, arbitrary or shaped like NAME.KEY=VALUE with any value, goes through parsing,
    coercion and each plugin's own checks to a working plugin or a one-line UsageError."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from trainer_core_plugins.datasets.fake import load as fake
    from trainer_core_plugins.models.smallcnn import build as smallcnn
    from trainer_core import UsageError
    from trainer_core.config import resolve_config
    from trainer_core.options import bind_options
    from trainer_core.pluginmanager import make_plugin_manager
    from trainer_core.runner import load_plugins

    shaped = st.builds(lambda o, k, v: f"{o}.{k}={v}", st.sampled_from(OWNERS), st.sampled_from(KEYS) | st.text(max_size=8),
                       st.text(max_size=12) | st.sampled_from(["-1", "0", "nan", "inf", "-inf", "1e999", "true", "none", "max"]))

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(shaped | st.text(max_size=20), min_size=1, max_size=3))
    def check(overrides: list[str]) -> None:
        try:
            config = resolve_config(None, {}, ["steplr,checkpoint,progress"], overrides)
            load_plugins(make_plugin_manager(), config.plugins)
            bind_options(smallcnn, config.model_options, owner="model", skip=("input_shape", "num_classes"))
            bind_options(fake, config.dataset_options, owner="dataset")
        except UsageError as exc:
            assert str(exc) and "\\n" not in str(exc), overrides

    check()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_whole_process_group_with_loader_workers_saves_and_resumes(
    tmp_path: Path, pace_env: dict[str, str], signum: signal.Signals
) -> None:
    # As Ctrl-C, a job scheduler or `kill -- -PGID` sends it: the DataLoader's worker processes get it too.
    from test_datasets import write_image_tree

    write_image_tree(tmp_path / "images", per_class=16, size=(12, 12))  # 32 training images: 8 steps of 4 an epoch
    run = ["--dataset", "imagefolder", "--data-root", str(tmp_path / "images"), "-o", "dataset.image_size=8",
           "--model", "mlp", "--num-workers", "2", "--device", "cpu", "--epochs", "2", "--batch-size", "4",
           "-q", "--plugins", "checkpoint,pace", "--run-dir", "run"]
    proc = subprocess.Popen([sys.executable, "-m", "trainer_core", "run", *run], cwd=tmp_path,
                            env={**pace_env, "PACE_PAUSE_AT": "3"}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(proc, "paused after step 3")
    os.killpg(proc.pid, signum)
    out = finish(proc, 128 + signum)
    assert f"fit end: received {signum.name}" in out
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["state"]["step"] == 4
    finish(start(tmp_path, pace_env, "--run-dir", "run", "--resume", "auto", "-q"))
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (last["state"]["epoch"], last["state"]["step"]) == (2, 16)
