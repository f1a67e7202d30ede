"""The checkpoint plugin: best-k retention, last.pt, restoring the best weights,
refusing non-finite saves, monitor checks, and its files as transfer-learning weights."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from trainer_core_plugins.checkpoint import Checkpoint
from trainer_core import UsageError, hookimpl, load_checkpoint, load_weights
from trainer_core.cli import make_cli
from trainer_core.testing import run_tiny, tiny_model


class Scripted:
    """Produces ``val/score``: one scripted value per epoch."""

    def __init__(self, values: list[float]) -> None:
        self.values = values

    @hookimpl
    def collect_eval_metrics(self, trainer: Any) -> dict[str, float]:
        return {"val/score": self.values[trainer.state.epoch - 1]}


def scripted_run(tmp_path: Path, values: list[float], **options: Any):
    plugin = Checkpoint(monitor="val/score", **options)
    trainer = run_tiny({"checkpoint": plugin, "script": Scripted(values)}, epochs=len(values), run_dir=tmp_path / "run")
    return trainer, plugin, tmp_path / "run" / "checkpoints"


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_the_default_monitor_is_the_task_s_headline_metric(tmp_path: Path) -> None:
    plugin = Checkpoint()
    plugin.on_fit_start(trainer=run_tiny(fit=False, run_dir=tmp_path / "run"))
    assert (plugin.monitor, plugin.mode) == ("val/acc", "max")


def test_mode_auto_follows_the_metric_name() -> None:
    assert Checkpoint(monitor="val/loss").mode == "min"
    assert Checkpoint(monitor="val/error").mode == "min"
    assert Checkpoint(monitor="val/loss", mode="max").mode == "max"


@pytest.mark.parametrize(
    ("options", "message"),
    [({"save_top_k": -2}, "save_top_k must be >= -1"), ({"every_n_steps": -1}, "every_n_steps must be >= 0"),
     ({"monitor": ""}, "monitor must name a metric")],
)
def test_bad_options_are_rejected(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Checkpoint(**options)


def test_hooks_in_isolation_rank_and_evict(tmp_path: Path) -> None:
    """on_eval / on_epoch_end called directly on a real, unstarted trainer: the decisions alone."""
    trainer = run_tiny(fit=False, run_dir=tmp_path / "run")
    plugin = Checkpoint(monitor="val/loss", save_top_k=2)
    plugin.on_fit_start(trainer=trainer)
    folder = tmp_path / "run" / "checkpoints"
    for epoch, loss in enumerate([0.9, 0.7, 0.8, 0.6], 1):
        trainer.state.epoch, trainer.state.step = epoch, 3 * epoch
        plugin.on_eval(metrics={"epoch": epoch, "step": 3 * epoch, "val/loss": loss, "val/acc": 0.5})
        plugin.on_epoch_end(trainer=trainer, epoch=epoch)
    assert [(k["epoch"], k["score"]) for k in plugin.kept] == [(4, 0.6), (2, 0.7)]
    assert files(folder) == ["best-epoch002-val_loss0.7000.pt", "best-epoch004-val_loss0.6000.pt", "last.pt"]
    assert load_checkpoint(folder / "last.pt")["state"]["step"] == 12
    trainer.state.step = 14  # trained on after the last save, then stopped: the end saves it
    list(plugin.on_fit_end(trainer=trainer))  # (a wrapper, run around the other plugins' on_fit_end: run it through)
    assert load_checkpoint(folder / "last.pt")["state"]["step"] == 14
    trainer.run_dir.close()


def test_keeps_the_best_k_and_last(tmp_path: Path) -> None:
    trainer, plugin, folder = scripted_run(tmp_path, [0.5, 0.9, 0.7, 0.95, 0.1], save_top_k=2, restore_best=False)
    assert files(folder) == ["best-epoch002-val_score0.9000.pt", "best-epoch004-val_score0.9500.pt", "last.pt"]
    assert [k["epoch"] for k in plugin.kept] == [4, 2]
    last = load_checkpoint(folder / "last.pt")
    assert last["state"]["epoch"] == 5 and last["state"]["step"] == trainer.state.step == 15
    best = load_checkpoint(folder / "best-epoch004-val_score0.9500.pt")
    assert best["state"]["epoch"] == 4 and best["state"]["metrics"]["val/score"] == 0.95
    # A best file records itself among the kept ones, so a resume from it knows its ranking.
    assert [k["file"] for k in best["plugins"]["checkpoint"]["kept"]] == [
        "best-epoch004-val_score0.9500.pt", "best-epoch002-val_score0.9000.pt"]
    assert not any(name.startswith(".") for name in files(folder))  # no temporary file left behind


def test_min_mode_all_and_none(tmp_path: Path) -> None:
    _, _, folder = scripted_run(tmp_path / "a", [3.0, 1.0, 2.0], mode="min", save_top_k=1)
    assert files(folder) == ["best-epoch002-val_score1.0000.pt", "last.pt"]
    _, _, folder = scripted_run(tmp_path / "b", [3.0, 1.0, 2.0], save_top_k=-1)
    assert len(files(folder)) == 4
    _, _, folder = scripted_run(tmp_path / "c", [3.0, 1.0, 2.0], save_top_k=0)
    assert files(folder) == ["last.pt"]


def test_ties_keep_the_earlier_checkpoint(tmp_path: Path) -> None:
    _, plugin, folder = scripted_run(tmp_path, [0.8, 0.8], restore_best=False)
    assert files(folder) == ["best-epoch001-val_score0.8000.pt", "last.pt"]


def test_restore_best_loads_the_best_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trainer, _, folder = scripted_run(tmp_path, [0.5, 0.9, 0.7])
    best = load_checkpoint(folder / "best-epoch002-val_score0.9000.pt")["model"]
    last = load_checkpoint(folder / "last.pt")["model"]
    final = trainer.model.state_dict()
    assert all(torch.equal(final[k], best[k]) for k in best)
    assert not all(torch.equal(final[k], last[k]) for k in last)  # training went on after the best epoch
    assert "checkpoint: restored the best weights (val/score 0.9000, epoch 2)" in capsys.readouterr().out


def test_restore_best_off_keeps_the_last_weights(tmp_path: Path) -> None:
    trainer, _, folder = scripted_run(tmp_path, [0.5, 0.9, 0.7], restore_best=False)
    last = load_checkpoint(folder / "last.pt")["model"]
    assert all(torch.equal(trainer.model.state_dict()[k], last[k]) for k in last)


def test_non_finite_score_never_replaces_a_checkpoint(tmp_path: Path) -> None:
    _, plugin, folder = scripted_run(tmp_path, [0.5, math.nan, 0.4], save_top_k=2, restore_best=False)
    assert files(folder) == ["best-epoch001-val_score0.5000.pt", "best-epoch003-val_score0.4000.pt", "last.pt"]
    # Not at the end of the run either, when the last epoch is the non-finite one.
    _, plugin, folder = scripted_run(tmp_path / "last-nan", [0.5, math.nan], restore_best=False)
    assert files(folder) == ["best-epoch001-val_score0.5000.pt", "last.pt"]
    assert load_checkpoint(folder / "last.pt")["state"]["step"] == 3


def test_non_finite_weights_are_not_saved(tmp_path: Path) -> None:
    class Poison:
        @hookimpl
        def on_epoch_end(self, trainer: Any, epoch: int) -> None:
            if epoch == 2:
                with torch.no_grad():
                    trainer.model[1].weight[0, 0] = math.nan

    plugin = Checkpoint()
    trainer = run_tiny({"checkpoint": plugin, "poison": Poison()}, epochs=2, run_dir=tmp_path / "run")
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["state"]["epoch"] == 1  # epoch 2's poisoned weights were refused, at the epoch end and at the fit end
    assert all(torch.isfinite(t).all() for t in last["model"].values())
    assert torch.isfinite(trainer.model[1].weight).all()  # and the restored best weights are the good ones


def test_unknown_monitor_fails_at_start_up_when_knowable(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"checkpoint.monitor: no evaluation produces 'val/accuracy' "
                                         r"\(did you mean 'val/acc'\?\); available metrics: train/loss, val/loss, val/acc"):
        run_tiny({"checkpoint": Checkpoint(monitor="val/accuracy")}, run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_monitor_fails_at_the_first_evaluation_with_metric_plugins(tmp_path: Path) -> None:
    plugins = {"checkpoint": Checkpoint(monitor="val/scor"), "script": Scripted([1.0, 1.0])}
    with pytest.raises(UsageError, match=r"'val/scor' \(did you mean 'val/score'\?\); available metrics: train/loss, "
                                         r"val/loss, val/acc, val/score"):
        run_tiny(plugins, run_dir=tmp_path / "run")
    # Refused before the run kept anything (no epoch ended, no checkpoint): the folder it made goes (issue 15, item 3).
    assert not (tmp_path / "run").exists()


def test_unknown_monitor_waits_for_the_shared_metrics_in_a_distributed_run(tmp_path: Path) -> None:
    # On a rank other than zero a rank-zero-only metric producer is not registered: refusing
    # there at start-up would stop that rank alone.  The evaluation's metrics are the same on every rank.
    trainer = run_tiny(fit=False)
    trainer.world_size = 2
    plugin = Checkpoint(monitor="val/f1", dirpath=tmp_path)
    plugin.on_fit_start(trainer=trainer)
    with pytest.raises(UsageError, match="checkpoint.monitor: no evaluation produces 'val/f1'"):
        plugin.on_eval(metrics={"epoch": 1, "step": 3, "val/loss": 1.0, "val/acc": 0.5})


def test_unknown_monitor_on_the_command_line_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(make_cli(), [
        "run", "--dataset", "fake", "--epochs", "1", "-q", "--plugins", "checkpoint", "-o", "checkpoint.monitor=val_acc",
        "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "error: checkpoint.monitor: no evaluation produces 'val_acc'" in result.output


def test_needs_a_folder(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="checkpoint.dirpath"):
        run_tiny({"checkpoint": Checkpoint()})
    run_tiny({"checkpoint": Checkpoint(dirpath=tmp_path / "elsewhere")}, epochs=1)
    assert (tmp_path / "elsewhere" / "last.pt").is_file()


def test_file_names_stay_readable_for_any_metric(tmp_path: Path) -> None:
    class PerClass:
        @hookimpl
        def collect_eval_metrics(self) -> dict[str, float]:
            return {"val/acc/3": 0.97}

    run_tiny({"checkpoint": Checkpoint(monitor="val/acc/3"), "per-class": PerClass()}, epochs=1, run_dir=tmp_path / "run")
    assert files(tmp_path / "run" / "checkpoints") == ["best-epoch001-val_acc_3-0.9700.pt", "last.pt"]


def test_every_n_steps_writes_last_mid_epoch(tmp_path: Path) -> None:
    steps = []

    class Watch:
        @hookimpl
        def on_batch_start(self, trainer: Any) -> None:
            path = tmp_path / "run" / "checkpoints" / "last.pt"
            if path.exists():
                steps.append(load_checkpoint(path)["state"]["step"])

    # 3 steps per epoch: saves mid-epoch at steps 2 and 4 and at epoch ends (3, 6), never at an
    # epoch's last batch (step 6 is one: it is saved after its evaluation).
    run_tiny({"checkpoint": Checkpoint(every_n_steps=2), "watch": Watch()}, epochs=2, run_dir=tmp_path / "run")
    assert steps == [2, 3, 4, 4]  # what last.pt holds before steps 3, 4, 5 and 6
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["state"]["step"] == 6


def test_stopped_mid_epoch_saves_its_progress(tmp_path: Path) -> None:
    class Stop:
        @hookimpl
        def on_batch_end(self, trainer: Any) -> None:
            if trainer.state.step == 4:
                trainer.request_stop("enough")

    trainer = run_tiny({"checkpoint": Checkpoint(), "stop": Stop()}, epochs=3, run_dir=tmp_path / "run")
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (last["state"]["epoch"], last["state"]["step"], last["state"]["batch_idx"]) == (2, 4, 1)
    assert trainer.state.stop_reason == "enough"


def test_the_end_save_comes_before_other_plugins_change_the_weights(tmp_path: Path) -> None:
    class Scramble:  # registered after checkpoint, so pluggy would call it first without tryfirst
        @hookimpl
        def on_fit_end(self, trainer: Any) -> None:
            with torch.no_grad():
                trainer.model[1].weight.zero_()

    class Stop:
        @hookimpl
        def on_batch_end(self, trainer: Any) -> None:
            if trainer.state.step == 4:
                trainer.request_stop("enough")

    seen = {}

    class Capture:
        @hookimpl(trylast=True)
        def on_batch_end(self, trainer: Any) -> None:
            seen["weights"] = trainer.model[1].weight.detach().clone()

    plugins = {"checkpoint": Checkpoint(restore_best=False), "stop": Stop(), "capture": Capture(), "scramble": Scramble()}
    run_tiny(plugins, epochs=2, run_dir=tmp_path / "run")
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["state"]["step"] == 4 and torch.equal(last["model"]["1.weight"], seen["weights"])


@pytest.mark.parametrize("checkpoint_first", [True, False])
def test_state_is_in_every_checkpoint_with_the_other_plugins(tmp_path: Path, checkpoint_first: bool) -> None:
    from trainer_core_plugins.steplr import StepLR

    plugins = {"checkpoint": Checkpoint(), "steplr": StepLR(step_size=1, gamma=0.5)}
    if not checkpoint_first:
        plugins = dict(reversed(plugins.items()))
    run_tiny(plugins, epochs=2, run_dir=tmp_path / "run")
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert set(last["plugins"]) == {"checkpoint", "steplr"}
    # Saved after steplr's epoch step (trylast), whatever the registration order.
    assert last["plugins"]["steplr"]["scheduler"]["last_epoch"] == 2
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0125)


def test_checkpoint_weights_load_for_transfer_learning(tmp_path: Path) -> None:
    _, _, folder = scripted_run(tmp_path, [0.5, 0.9])
    source = load_checkpoint(folder / "best-epoch002-val_score0.9000.pt")["model"]
    model = tiny_model(num_classes=5)  # a new head: 5 classes instead of 3
    skipped = load_weights(model, folder / "best-epoch002-val_score0.9000.pt")
    assert skipped == ["3.bias", "3.weight"]
    assert torch.equal(model[1].weight, source["1.weight"]) and torch.equal(model[1].bias, source["1.bias"])
    assert model[3].weight.shape == (5, 16)


def test_truncated_checkpoint_is_a_clear_one_line_error(tmp_path: Path) -> None:
    _, _, folder = scripted_run(tmp_path, [0.5])
    broken = tmp_path / "broken.pt"
    broken.write_bytes((folder / "last.pt").read_bytes()[:500])
    with pytest.raises(UsageError) as info:
        load_checkpoint(broken)
    message = str(info.value)
    assert message.startswith(f"checkpoint {broken} is damaged or not a checkpoint: ") and "\n" not in message
    with pytest.raises(UsageError, match="is damaged"):
        load_weights(tiny_model(), broken)
    result = CliRunner().invoke(make_cli(), ["run", "--resume", str(broken)])
    assert result.exit_code == 2 and result.output == f"error: {message}\n"


@pytest.mark.slow
def test_a_failing_write_is_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    """A file-size limit (as a full disk would) makes the second epoch's save fail for real."""
    import resource
    import subprocess
    import sys

    run = tmp_path / "run"
    first = CliRunner().invoke(make_cli(), ["run", "--dataset", "fake", "--epochs", "1", "-q", "--device", "cpu",
                                            "--plugins", "checkpoint", "--run-dir", str(run)])
    assert first.exit_code == 0, first.output
    before = (run / "checkpoints" / "last.pt").read_bytes()
    assert len(before) > 100_000

    def limit() -> None:  # in the child: files may not grow past 100 kB (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    second = subprocess.run([sys.executable, "-m", "trainer_core", "run", "--resume", str(run), "--epochs", "2", "-q"],
                            capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert second.returncode == 1
    assert second.stderr.count("\n") == 1 and "error: cannot write checkpoint" in second.stderr
    assert "File too large; the previous checkpoints are intact" in second.stderr
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["epoch"] == 1
