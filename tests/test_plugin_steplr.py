"""The steplr plugin: the seed's StepLR schedule, per epoch or per step, in isolation and in real runs."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

from trainer_core_plugins.steplr import StepLR
from trainer_core.cli import make_cli
from trainer_core.testing import HookRecorder, run_tiny, tiny_data


def started(plugin: StepLR, lr: float = 1.0):
    """A real, unstarted trainer with an optimizer, and ``plugin`` started on it."""
    trainer = run_tiny(fit=False)
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=lr)
    plugin.on_fit_start(trainer=trainer)
    trainer.optimizer.step()  # as in training: the optimizer steps before the scheduler
    return trainer


def test_defaults_are_the_seeds_schedule() -> None:
    plugin = StepLR()
    assert (plugin.step_size, plugin.gamma, plugin.interval) == (7, 0.1, "epoch")


def test_decays_every_step_size_epochs() -> None:
    plugin = StepLR(step_size=2, gamma=0.5)
    trainer = started(plugin)
    seen = []
    assert plugin.on_batch_end is None  # per-epoch mode: not even called per step
    for _ in range(5):
        plugin.on_epoch_end()
        seen.append(trainer.optimizer.param_groups[0]["lr"])
    assert seen == [1.0, 0.5, 0.5, 0.25, 0.25]


def test_interval_step_counts_optimizer_steps() -> None:
    plugin = StepLR(step_size=3, gamma=0.1, interval="step")
    trainer = started(plugin)
    for batch in range(9):
        # every third batch accumulates (or is skipped): no optimizer step
        plugin.on_batch_end(optimizer_stepped=batch % 3 != 2)
    plugin.on_epoch_end()  # per-step mode: epochs do not count
    assert plugin.scheduler.last_epoch == 6
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_state_round_trip_continues_the_schedule() -> None:
    first = StepLR(step_size=2, gamma=0.5)
    started(first)
    for _ in range(3):
        first.on_epoch_end()
    state = first.plugin_state_dict()
    second = StepLR(step_size=2, gamma=0.5)
    trainer = started(second)
    second.load_plugin_state(state=state)
    second.on_epoch_end()  # the fourth epoch ends: the second decay
    assert second.scheduler.last_epoch == 4
    # The optimizer's lr itself travels with the optimizer state; the scheduler multiplies it.
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"step_size": 0}, "steplr.step_size must be >= 1 (got 0)"), ({"gamma": -1.0}, "steplr.gamma must be > 0 (got -1.0)"),
     ({"gamma": math.nan}, "steplr.gamma must be > 0"), ({"interval": "batch"}, "steplr.interval must be epoch or step")],
)
def test_bad_options_are_rejected(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        StepLR(**options)


def test_bad_option_on_the_command_line_is_one_line_and_exit_2(tmp_path) -> None:
    result = CliRunner().invoke(
        make_cli(), ["run", "--dataset", "fake", "--plugins", "steplr", "-o", "steplr.gamma=-1", "--run-dir", str(tmp_path / "run")]
    )
    assert result.exit_code == 2
    assert result.output.strip() == "error: steplr: steplr.gamma must be > 0 (got -1.0)"
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def lrs_per_epoch(recorder: HookRecorder) -> list[float]:
    """The lr reported by the last training log of each epoch."""
    by_epoch: dict[int, float] = {}
    epoch = 0
    for name, kwargs in recorder.calls:
        if name == "on_epoch_start":
            epoch = kwargs["epoch"]
        if name == "on_train_log":
            by_epoch[epoch] = kwargs["metrics"]["lr"]
    return [by_epoch[e] for e in sorted(by_epoch)]


def test_real_run_matches_torch_steplr_by_hand(tmp_path) -> None:
    recorder = HookRecorder()
    run_tiny({"steplr": StepLR(step_size=2, gamma=0.5), "rec": recorder}, epochs=5, run_dir=tmp_path / "run")
    # The hand-written schedule: the lr each epoch trains with.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    expected = []
    for _ in range(5):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs_per_epoch(recorder) == pytest.approx(expected)
    assert expected[-1] == pytest.approx(0.0125)


def test_real_run_per_step(tmp_path) -> None:
    recorder = HookRecorder()
    # 48 samples, batch 16: 3 steps per epoch; log every step to see each lr.
    run_tiny({"steplr": StepLR(step_size=2, gamma=0.5, interval="step"), "rec": recorder}, epochs=2, log_every_n_steps=1)
    lrs = [kwargs["metrics"]["lr"] for kwargs in recorder.kwargs("on_train_log")]
    # The lr is read after each step's scheduler.step(): it halves after steps 2, 4 and 6.
    assert lrs == pytest.approx([0.05, 0.025, 0.025, 0.0125, 0.0125, 0.00625])


def test_per_step_counts_optimizer_steps_with_gradient_accumulation() -> None:
    recorder = HookRecorder()
    run_tiny({"steplr": StepLR(step_size=1, gamma=0.5, interval="step"), "rec": recorder}, epochs=2, log_every_n_steps=1,
             accumulate_grad_batches=2)
    lrs = [kwargs["metrics"]["lr"] for kwargs in recorder.kwargs("on_train_log")]
    # 3 batches per epoch, 2 per optimizer step: steps after batches 2 and 3 (the epoch's end) of each epoch.
    assert lrs == pytest.approx([0.05, 0.025, 0.0125, 0.0125, 0.00625, 0.003125])


@pytest.mark.parametrize("accumulate", [1, 2])
def test_per_step_skips_batches_without_an_optimizer_step(accumulate: int) -> None:
    """A batch skipped for a non-finite loss takes no optimizer step, so no scheduler step either."""
    data = tiny_data()
    data.train.inputs[5] = float("nan")  # one poisoned batch per epoch
    plugin = StepLR(step_size=1, gamma=0.5, interval="step")
    trainer = run_tiny({"steplr": plugin}, data=data, epochs=2, nonfinite="skip", optimizer="adam",
                       accumulate_grad_batches=accumulate)
    assert trainer.stepper.skipped == 2
    # Adam counts the steps it really took.
    taken = int(trainer.optimizer.state[next(trainer.model.parameters())]["step"])
    if accumulate == 1:
        assert taken == 6 - 2
    assert plugin.scheduler.last_epoch == taken
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**taken)
