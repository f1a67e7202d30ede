"""The early-stopping plugin: its decisions in isolation, in real tiny runs, and across a resume."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from trainer_core_plugins.checkpoint import Checkpoint
from trainer_core_plugins.early_stopping import EarlyStopping
from trainer_core import RunConfig, Trainer, UsageError, load_checkpoint
from trainer_core.cli import make_cli
from trainer_core.testing import run_tiny, tiny_data, tiny_model

# min_delta larger than any accuracy change: only the first evaluation ever "improves".
NEVER_IMPROVES = dict(monitor="val/acc", min_delta=10.0)


def feed(plugin: EarlyStopping, values: list[float], monitor: str = "val/loss") -> Trainer:
    """Call on_eval directly on a real, unstarted trainer, one value per epoch."""
    trainer = run_tiny(fit=False)
    plugin.on_fit_start(trainer=trainer)
    for epoch, value in enumerate(values, 1):
        trainer.state.epoch = epoch
        plugin.on_eval(trainer=trainer, metrics={"epoch": epoch, "step": epoch, "val/loss": 1.0, monitor: value})
        if trainer.state.should_stop:
            break
    return trainer


def test_mode_auto_follows_the_metric_name() -> None:
    assert EarlyStopping(monitor="val/loss").mode == "min"
    assert EarlyStopping(monitor="val/error").mode == "min"
    assert EarlyStopping(monitor="val/acc").mode == "max"
    assert EarlyStopping(monitor="val/loss", mode="max").mode == "max"


def test_stops_after_patience_evaluations_without_improvement() -> None:
    plugin = EarlyStopping(monitor="val/loss", patience=2)
    trainer = feed(plugin, [1.0, 0.8, 0.9, 0.85, 0.7])
    assert trainer.state.should_stop
    assert trainer.state.epoch == 4  # 0.9 and 0.85 are both worse than 0.8
    assert plugin.best == 0.8 and plugin.best_epoch == 2
    assert "val/loss did not improve for 2" in trainer.state.stop_reason


def test_improvement_resets_the_counter() -> None:
    plugin = EarlyStopping(monitor="val/loss", patience=2)
    trainer = feed(plugin, [1.0, 1.1, 0.9, 1.0, 0.8, 0.9])
    assert not trainer.state.should_stop
    assert plugin.wait == 1 and plugin.best == 0.8


def test_min_delta_and_max_mode() -> None:
    plugin = EarlyStopping(monitor="val/acc", patience=2, min_delta=0.05)
    trainer = feed(plugin, [0.50, 0.54, 0.549, 0.60], monitor="val/acc")
    # 0.54 and 0.549 are within min_delta of 0.50: the run stops before seeing 0.60.
    assert trainer.state.should_stop and trainer.state.epoch == 3
    assert plugin.best == 0.50


def test_nan_never_counts_as_improvement() -> None:
    plugin = EarlyStopping(monitor="val/loss", patience=1)
    trainer = feed(plugin, [1.0, math.nan])
    assert trainer.state.should_stop and plugin.best == 1.0


def test_unknown_metric_is_a_usage_error_listing_the_available_ones() -> None:
    trainer = run_tiny(fit=False)
    with pytest.raises(UsageError, match=r"early-stopping.monitor: no evaluation produces 'val/f1'.*; available metrics: val/loss, val/acc$"):
        EarlyStopping(monitor="val/f1").on_eval(trainer=trainer, metrics={"epoch": 1, "step": 3, "val/loss": 1.0, "val/acc": 0.5})


def test_unknown_metric_fails_before_training_when_knowable(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"'val/accuracy' \(did you mean 'val/acc'\?\); available metrics: train/loss, val/loss, val/acc$"):
        run_tiny({"early-stopping": EarlyStopping(monitor="val/accuracy")}, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before training: the folder this start made is gone again


@pytest.mark.parametrize(
    ("options", "message"),
    [({"patience": 0}, "patience must be >= 1"), ({"min_delta": -1.0}, "min_delta must be >= 0"),
     ({"min_delta": math.nan}, "min_delta must be >= 0"), ({"monitor": ""}, "monitor")],
)
def test_bad_options_are_rejected(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EarlyStopping(**options)


def test_bad_option_on_the_command_line_is_one_line() -> None:
    result = CliRunner().invoke(make_cli(), ["run", "--dataset", "fake", "--plugins", "early-stopping", "-o", "early-stopping.patience=0"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: early-stopping: early-stopping.patience must be >= 1 (got 0)"


def test_real_run_stops_early(tmp_path: Path) -> None:
    trainer = run_tiny({"early-stopping": EarlyStopping(patience=2, **NEVER_IMPROVES)}, epochs=10, run_dir=tmp_path / "run")
    assert trainer.state.epoch == 3
    assert trainer.state.stop_reason.startswith("early-stopping: val/acc did not improve for 2")
    assert '"status": "stopped"' in (tmp_path / "run" / "summary.json").read_text()


def test_real_run_without_stalling_runs_every_epoch() -> None:
    trainer = run_tiny({"early-stopping": EarlyStopping(monitor="val/loss", patience=5)}, epochs=3)
    assert trainer.state.epoch == 3 and not trainer.state.should_stop


def weights_after(epochs: int) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in run_tiny(epochs=epochs).model.state_dict().items()}


def test_restore_best_weights_loads_the_best_epochs_weights() -> None:
    trainer = run_tiny({"es": EarlyStopping(patience=2, restore_best_weights=True, **NEVER_IMPROVES)}, epochs=10)
    assert trainer.state.epoch == 3
    best, last = weights_after(1), weights_after(3)
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, best[key]), key
    assert any(not torch.equal(best[k], last[k]) for k in best)  # restoring really changed something


def test_without_restore_the_final_weights_stay() -> None:
    trainer = run_tiny({"es": EarlyStopping(patience=2, **NEVER_IMPROVES)}, epochs=10)
    last = weights_after(3)
    assert all(torch.equal(v, last[k]) for k, v in trainer.model.state_dict().items())


def resumed(payload: dict, plugin: EarlyStopping, epochs: int) -> Trainer:
    data = tiny_data()
    config = RunConfig(epochs=epochs, batch_size=16, lr=0.05, device="cpu", plugins={}, model="tiny", dataset="tiny")
    trainer = Trainer(tiny_model(), data, config, plugins={"early-stopping": plugin}, resume=payload)
    trainer.fit()
    return trainer


def test_patience_survives_a_resume(tmp_path: Path) -> None:
    uninterrupted = run_tiny({"early-stopping": EarlyStopping(patience=3, **NEVER_IMPROVES)}, epochs=10)
    assert uninterrupted.state.epoch == 4

    # Stopped after epoch 2 (its last.pt, as --resume reads it), the best weights being epoch 1's.
    first = {"checkpoint": Checkpoint(restore_best=False),
             "early-stopping": EarlyStopping(patience=3, restore_best_weights=True, **NEVER_IMPROVES)}
    run_tiny(first, run_dir=tmp_path / "run", epochs=2)
    payload = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")  # weights_only: plain data and tensors
    saved = payload["plugins"]["early-stopping"]
    assert (saved["wait"], saved["best_epoch"]) == (1, 1)
    assert set(saved["best_weights"]) == set(payload["model"])

    plugin = EarlyStopping(patience=3, restore_best_weights=True, **NEVER_IMPROVES)
    trainer = resumed(payload, plugin, epochs=10)
    # Without the saved counter the resumed run would wait three more epochs (to epoch 5).
    assert trainer.state.epoch == 4 and plugin.best_epoch == 1
    best = weights_after(1)
    assert all(torch.equal(v, best[k]) for k, v in trainer.model.state_dict().items())


def test_state_for_another_metric_is_ignored_on_resume(caplog: pytest.LogCaptureFixture) -> None:
    first = run_tiny({"early-stopping": EarlyStopping(patience=3, **NEVER_IMPROVES)}, epochs=2)
    plugin = EarlyStopping(monitor="val/loss", patience=3)
    with caplog.at_level(logging.WARNING, logger="trainer_core"):
        plugin.load_plugin_state(trainer=first, state=first.checkpoint_state()["plugins"]["early-stopping"])
    assert plugin.best is None and plugin.wait == 0
    assert "watched val/acc (max), this one watches val/loss (min); patience starts afresh" in caplog.text


def test_restoring_twice_with_the_checkpoint_plugin_is_refused(tmp_path: Path) -> None:
    plugins = {"checkpoint": Checkpoint(), "early-stopping": EarlyStopping(restore_best_weights=True)}
    with pytest.raises(UsageError, match="keep one: -o checkpoint.restore_best=false"):
        run_tiny(plugins, run_dir=tmp_path / "run")
    # Found by what it is, not by its name.
    plugins = {"best-ckpt": Checkpoint(), "early-stopping": EarlyStopping(restore_best_weights=True)}
    with pytest.raises(UsageError, match="and best-ckpt.restore_best both restore.*keep one: -o best-ckpt.restore_best=false"):
        run_tiny(plugins, run_dir=tmp_path / "run")
    # One restorer is fine, whichever it is.
    trainer = run_tiny({"checkpoint": Checkpoint(restore_best=False), "early-stopping": EarlyStopping(restore_best_weights=True)},
                       run_dir=tmp_path / "run2")
    assert trainer.state.epoch == 2


def test_resuming_a_stopped_run_stops_at_once_unless_patience_grows() -> None:
    stopped = run_tiny({"early-stopping": EarlyStopping(patience=2, **NEVER_IMPROVES)}, epochs=10)
    assert stopped.state.epoch == 3
    payload = stopped.checkpoint_state()
    again = resumed(payload, EarlyStopping(patience=2, **NEVER_IMPROVES), epochs=10)
    assert again.state.epoch == 3 and "already stopped" in again.state.stop_reason
    longer = resumed(payload, EarlyStopping(patience=4, **NEVER_IMPROVES), epochs=10)
    assert longer.state.epoch == 5  # two more evaluations without improvement
