"""Exact resume: a run continued from a checkpoint ends bit-identical to one that
never stopped, at an epoch boundary and mid-epoch, with steplr, freeze and
checkpoint on; through the API and through real ``trainer run`` processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from trainer_core_plugins.checkpoint import Checkpoint
from trainer_core_plugins.freeze import Freeze
from trainer_core_plugins.steplr import StepLR
from test_plugin_checkpoint import Scripted
from test_reliability import PoisonStep
from trainer_core import RunConfig, Trainer, hookimpl, load_checkpoint
from trainer_core.checkpointing import find_checkpoint
from trainer_core.cli import make_cli
from trainer_core.errors import PluginError, UsageError
from trainer_core.rundir import RunDir
from trainer_core.runtime import seed_everything
from trainer_core.testing import tiny_data


def model() -> nn.Module:
    # Dropout makes the result depend on the restored RNG state too.
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def plugins(**checkpoint: Any) -> dict[str, object]:
    return {
        "checkpoint": Checkpoint(restore_best=False, **checkpoint),
        "steplr": StepLR(step_size=1, gamma=0.7),
        "freeze": Freeze(unfreeze_at_epoch=2, unfreeze_lr_factor=0.5),
    }


def fit(run_dir: Path, epochs: int, extra: dict[str, object], resume: bool = False, **settings: Any) -> Trainer:
    """A real tiny run (3 steps per epoch), fresh or resumed from ``run_dir``'s newest checkpoint."""
    config = RunConfig(epochs=epochs, batch_size=16, lr=0.05, device="cpu", plugins={}, model="tiny", dataset="tiny", **settings)
    seed_everything(config.seed)
    payload = load_checkpoint(find_checkpoint(run_dir)) if resume else None
    folder = RunDir.create(run_dir, resume=resume, overwrite=not resume)
    trainer = Trainer(model(), tiny_data(), config, plugins=extra, run_dir=folder, resume=payload)
    trainer.fit()
    return trainer


def assert_same_run(a: Trainer, b: Trainer) -> None:
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for key, state in sa["state"].items():
        for field, value in state.items():
            assert torch.equal(value, sb["state"][key][field]), (key, field)
    assert a.run_path is not None and b.run_path is not None
    assert (a.run_path / "metrics.jsonl").read_text() == (b.run_path / "metrics.jsonl").read_text()


class Logs:
    """Records every training log as (step, metrics)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, dict[str, float]]] = []

    @hookimpl
    def on_train_log(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.seen.append((trainer.state.step, dict(metrics)))


class Kill:
    """Fails the run in on_batch_end of ``step``, before the checkpoint plugin could save it."""

    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def on_batch_end(self, trainer: Trainer) -> None:
        if trainer.state.step == self.step:
            raise RuntimeError("killed")


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Trainer, Logs]]:
    """The uninterrupted 3-epoch run for given settings (computed once each)."""
    done: dict[tuple, tuple[Trainer, Logs]] = {}

    def get(**settings: Any) -> tuple[Trainer, Logs]:
        key = tuple(sorted(settings.items()))
        if key not in done:
            logs = Logs()
            trainer = fit(tmp_path_factory.mktemp("straight") / "run", 3, {**plugins(), "logs": logs}, **settings)
            done[key] = (trainer, logs)
        return done[key]

    return get


@pytest.mark.parametrize("stopped_after", [1, 2])  # before and after freeze's unfreezing at epoch 2
def test_resume_at_an_epoch_boundary_is_exact(tmp_path: Path, straight, stopped_after: int) -> None:
    reference, _ = straight()
    fit(tmp_path / "run", stopped_after, plugins())
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert saved["plugins"]["freeze"] == {"unfrozen": stopped_after >= 2}
    assert len(saved["optimizer"]["param_groups"]) == (2 if stopped_after >= 2 else 1)
    resumed = fit(tmp_path / "run", 3, plugins(), resume=True)
    assert resumed.state.epoch == 3 and resumed.state.step == 9
    assert len(resumed.optimizer.param_groups) == 2
    assert_same_run(reference, resumed)


@pytest.mark.parametrize(
    ("log_every", "killed_at", "resumed_from", "first_log"),
    [(3, 5, 4, 6),  # mid-epoch 2, between two logs
     (2, 3, 2, 2),  # saved at a logging step, before its log: the log is replayed on resume
     (1, 8, 6, 7)],  # step 6 ends epoch 2: saved after its evaluation, not mid-epoch
)
def test_mid_epoch_resume_is_exact(
    tmp_path: Path, straight, log_every: int, killed_at: int, resumed_from: int, first_log: int
) -> None:
    reference, reference_logs = straight(log_every_n_steps=log_every)
    with pytest.raises(PluginError, match="plugin 'kill' failed in on_batch_end"):
        fit(tmp_path / "run", 3, {**plugins(every_n_steps=2), "kill": Kill(killed_at)}, log_every_n_steps=log_every)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["state"]["step"] == resumed_from
    logs = Logs()
    resumed = fit(tmp_path / "run", 3, {**plugins(every_n_steps=2), "logs": logs}, resume=True, log_every_n_steps=log_every)
    assert_same_run(reference, resumed)
    # The training logs from the resume point on are the uninterrupted run's, values and intervals.
    assert logs.seen == [entry for entry in reference_logs.seen if entry[0] >= first_log]
    assert logs.seen[0][0] == first_log


@pytest.mark.parametrize(("killed_at", "resumed_from"), [(5, 3), (6, 5)])
def test_mid_epoch_saves_wait_for_gradient_accumulation(tmp_path: Path, straight, killed_at: int, resumed_from: int) -> None:
    """With 2 batches per optimizer step, step 4 holds half-accumulated gradients: no save there."""
    reference, _ = straight(accumulate_grad_batches=2)
    with pytest.raises(PluginError):
        fit(tmp_path / "run", 3, {**plugins(every_n_steps=1), "kill": Kill(killed_at)}, accumulate_grad_batches=2)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["state"]["step"] == resumed_from
    resumed = fit(tmp_path / "run", 3, plugins(every_n_steps=1), resume=True, accumulate_grad_batches=2)
    assert_same_run(reference, resumed)


def test_mid_epoch_saves_wait_for_an_optimizer_step_after_a_skipped_batch(tmp_path: Path) -> None:
    """Accumulating 2 batches, step 5 skipped: step 4's gradients are still pending after it, so no save there."""
    settings: dict[str, Any] = dict(accumulate_grad_batches=2, nonfinite="skip")
    reference = fit(tmp_path / "straight", 3, {**plugins(), "poison": PoisonStep(5)}, **settings)
    assert reference.stepper.skipped == 1
    with pytest.raises(PluginError):
        fit(tmp_path / "run", 3, {**plugins(every_n_steps=1), "poison": PoisonStep(5), "kill": Kill(6)}, **settings)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["state"]["step"] == 3
    resumed = fit(tmp_path / "run", 3, {**plugins(every_n_steps=1), "poison": PoisonStep(5)}, resume=True, **settings)
    assert_same_run(reference, resumed)


def test_resume_after_a_stop_mid_epoch_is_exact(tmp_path: Path, straight) -> None:
    """A run stopped part-way (a signal, a plugin) saves its progress at the end and resumes from it."""

    class Stop:
        @hookimpl
        def on_batch_end(self, trainer: Trainer) -> None:
            if trainer.state.step == 4:
                trainer.request_stop("asked to stop")

    reference, _ = straight()
    fit(tmp_path / "run", 3, {**plugins(), "stop": Stop()})
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["state"]["step"] == 4
    assert_same_run(reference, fit(tmp_path / "run", 3, plugins(), resume=True))


def test_resume_keeps_a_better_best(tmp_path: Path) -> None:
    """keras #17012: the best score travels in the checkpoint, so a worse epoch after a resume is not 'best'."""
    fit(tmp_path / "run", 2, {"checkpoint": Checkpoint(monitor="val/score"), "script": Scripted([0.9, 0.5, 0.6])})
    resumed = fit(tmp_path / "run", 3, {"checkpoint": Checkpoint(monitor="val/score"), "script": Scripted([0.9, 0.5, 0.6])},
                  resume=True)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["best-epoch001-val_score0.9000.pt", "last.pt"]
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best-epoch001-val_score0.9000.pt")["model"]
    assert all(torch.equal(resumed.model.state_dict()[k], v) for k, v in best.items())  # restored from before the resume


def trainer_run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "trainer_core", "run", "--dataset", "fake", "--device", "cpu", "-q", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_resume_in_real_processes(tmp_path: Path) -> None:
    common = ("--plugins", "checkpoint,steplr", "-o", "steplr.step_size=1", "-o", "checkpoint.every_n_steps=2")
    # --resume auto on a run with no checkpoint yet starts it; a run folder continues with more epochs.
    first = trainer_run("--run-dir", "a", "--resume", "auto", "--epochs", "2", *common, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = trainer_run("--resume", "a", "--epochs", "3", cwd=tmp_path)  # options and plugins come from the checkpoint
    assert second.returncode == 0, second.stderr
    # The uninterrupted reference runs in this process, to save a start-up.
    plain = CliRunner().invoke(make_cli(), ["run", "--dataset", "fake", "--device", "cpu", "-q", "--run-dir", str(tmp_path / "b"),
                                            "--epochs", "3", *common])
    assert plain.exit_code == 0, plain.output
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert a["state"]["epoch"] == 3 and a["state"]["step"] == b["state"]["step"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert a["plugins"]["steplr"] == b["plugins"]["steplr"]
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (tmp_path / "b" / "metrics.jsonl").read_text()
    # --resume auto on a run with checkpoints continues it (in this process, to save a start-up).
    result = CliRunner().invoke(make_cli(), ["run", "--run-dir", str(tmp_path / "a"), "--resume", "auto", "--epochs", "4", "-q"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["epoch"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_resume_auto_needs_a_run_name(tmp_path: Path) -> None:
    result = CliRunner().invoke(make_cli(), ["run", "--resume", "auto", "--dataset", "fake"])
    assert result.exit_code == 2
    assert result.output == "error: --resume auto needs --name or --run-dir to know which run to continue\n"


def test_resume_of_a_folder_without_checkpoints_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    result = CliRunner().invoke(make_cli(), ["run", "--resume", str(tmp_path / "run")])
    assert result.exit_code == 2 and "no checkpoint in" in result.output and result.output.count("\n") == 1


def test_interrupted_save_leaves_no_candidate(tmp_path: Path) -> None:
    """A temporary file of a save killed half-way is never picked by --resume, even when newest."""
    fit(tmp_path / "run", 1, {"checkpoint": Checkpoint()})
    folder = tmp_path / "run" / "checkpoints"
    (folder / ".last.pt.abc123.tmp").write_bytes((folder / "last.pt").read_bytes()[:100])
    picked = find_checkpoint(tmp_path / "run")
    assert not picked.name.startswith(".")
    load_checkpoint(picked)


def test_checkpoint_of_another_class_count_names_the_keys(tmp_path: Path) -> None:
    fit(tmp_path / "run", 1, {"checkpoint": Checkpoint()})
    payload = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    config = RunConfig(epochs=2, batch_size=16, device="cpu", plugins={}, model="tiny", dataset="tiny")
    five = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 5))
    trainer = Trainer(five, tiny_data(num_classes=5), config, resume=payload)
    with pytest.raises(UsageError) as info:
        trainer.fit()
    assert str(info.value) == (
        "checkpoint does not fit this model (shape in checkpoint vs model: 4.weight (3, 16) vs (5, 16), 4.bias (3,) vs (5,)): "
        "resume with the same model and classes, or start from its weights with a new head with -o model.weights=PATH")


def test_tensorboard_training_accuracy_is_exact_across_a_mid_interval_resume(tmp_path: Path) -> None:
    """Saved at step 4 of the logging interval 4-6: the counts of step 4 travel in the checkpoint."""
    from trainer_core_plugins.tensorboard import TensorBoard
    from test_plugin_tensorboard import read_events, scalars

    def board() -> dict[str, object]:
        return {"tensorboard": TensorBoard(images=0, graph=False, pr_curves=False, histogram_every_n_steps=0, train_accuracy=True)}

    fit(tmp_path / "straight", 3, {**plugins(), **board()}, log_every_n_steps=3)
    with pytest.raises(PluginError):
        fit(tmp_path / "run", 3, {**plugins(every_n_steps=2), **board(), "kill": Kill(5)}, log_every_n_steps=3)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["state"]["step"] == 4
    fit(tmp_path / "run", 3, {**plugins(every_n_steps=2), **board()}, resume=True, log_every_n_steps=3)
    expected = scalars(read_events(tmp_path / "straight"), "train/acc")
    assert [step for step, _ in expected] == [3, 6, 9]
    assert scalars(read_events(tmp_path / "run"), "train/acc") == expected
