"""The loop itself: reproducibility, options that change a step, signals, non-finite losses."""

import json
import math
import os
import signal
import subprocess
import sys


import pytest
import torch

from trainer_core import TrainerError, hookimpl
from trainer_core.data import DataBundle, TensorSplit
from trainer_core.runtime import select_device
from trainer_core.testing import HookRecorder, run_tiny, tiny_data


def weights(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_cpu_run_repeats_exactly_with_the_same_seed():
    assert same(weights(run_tiny(seed=3)), weights(run_tiny(seed=3)))
    assert not same(weights(run_tiny(seed=3)), weights(run_tiny(seed=4)))


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_each_optimizer_learns(optimizer):
    trainer = run_tiny(optimizer=optimizer, lr=0.05, epochs=3)
    assert isinstance(trainer.optimizer, {"sgd": torch.optim.SGD, "adam": torch.optim.Adam,
                                          "adamw": torch.optim.AdamW}[optimizer])
    assert trainer.state.metrics["val/acc"] >= 0.9


def test_auto_device_is_cpu_without_accelerators():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: auto would pick it")
    assert select_device("auto").type in ("cpu", "mps")


def test_gradient_accumulation_matches_one_big_batch():
    # Two batches of 8 with accumulation give the same update as one batch of 16 (plain SGD).
    big = run_tiny(batch_size=16, optimizer="sgd", momentum=0.0, epochs=1)
    accumulated = run_tiny(batch_size=8, accumulate_grad_batches=2, optimizer="sgd", momentum=0.0, epochs=1)
    for a, b in zip(weights(big), weights(accumulated)):
        assert torch.allclose(a, b, atol=1e-6)


def test_clipping_bounds_every_step():
    norms = []

    class Watch:
        @hookimpl
        def on_before_optimizer_step(self, optimizer):
            # The hook sees gradients before clipping; measure what the step will use after it.
            params = [p for g in optimizer.param_groups for p in g["params"]]
            self.before = [p.detach().clone() for p in params]
            self.params = params

        @hookimpl
        def on_batch_end(self):
            step = torch.cat([(p.detach() - b).flatten() for p, b in zip(self.params, self.before)])
            norms.append(step.norm().item())

    run_tiny({"watch": Watch()}, optimizer="sgd", momentum=0.0, lr=1.0, clip_grad_norm=0.01)
    # With plain SGD at lr 1, an update's norm is the clipped gradient's norm.
    assert norms and max(norms) <= 0.01 + 1e-6


@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_mixed_precision_trains(precision):
    trainer = run_tiny(precision=precision, epochs=3)
    assert trainer.state.metrics["val/acc"] >= 0.9
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # weights stay fp32


def test_channels_last_trains_a_cnn():
    from trainer_core_plugins.models.smallcnn import build

    data = tiny_data(shape=(3, 8, 8))
    trainer = run_tiny(model=build((3, 8, 8), 3, width=4), data=data, channels_last=True)
    conv = trainer.model.features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert trainer.state.metrics["val/acc"] > 0.5


def poisoned_data():
    """Tiny data whose sample 5 is NaN: the batch holding it has a NaN loss."""
    data = tiny_data()
    inputs = data.train.inputs.clone()
    inputs[5] = float("nan")
    return DataBundle(TensorSplit(inputs, data.train.targets), data.val, data.classes, data.input_shape)


def test_a_non_finite_loss_stops_the_run_naming_epoch_and_step(tmp_path):
    with pytest.raises(TrainerError, match=r"training loss became nan in epoch 1 by step \d+; lower the learning rate"):
        run_tiny(data=poisoned_data(), run_dir=tmp_path / "run", log_every_n_steps=1)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


def test_non_finite_steps_can_be_skipped(tmp_path):
    trainer = run_tiny(data=poisoned_data(), nonfinite="skip", run_dir=tmp_path / "run", epochs=3)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_steps"] == 3 and summary["status"] == "completed"  # one poisoned batch per epoch
    assert trainer.state.metrics["val/acc"] >= 0.9


def test_a_logging_interval_of_skipped_steps_only_logs_nothing(tmp_path):
    recorder = HookRecorder()
    trainer = run_tiny({"recorder": recorder}, data=poisoned_data(), nonfinite="skip", log_every_n_steps=1, epochs=2)
    logs = [kwargs["metrics"] for kwargs in recorder.kwargs("on_train_log")]
    assert len(logs) == trainer.state.step - 2  # one per step but the two skipped ones
    assert all(math.isfinite(m["train/loss"]) and m["train/samples"] > 0 for m in logs)


SLOW_PLUGIN = """
    import time
    from trainer_core import hookimpl

    class Slow:
        '''Makes every step take a while, so a signal lands mid-run.'''

        @hookimpl
        def on_batch_end(self, trainer):
            if trainer.state.step == 2:
                print("ready", flush=True)
            time.sleep(0.05)

        @hookimpl
        def on_fit_end(self, trainer):
            print("fit end:", trainer.state.stop_reason, flush=True)
"""


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_cleanly_after_the_step(fake_entry_points, tmp_path, signum, code):
    folder = fake_entry_points("slow-dist", {"trainer.plugins": {"slow": "slow_plugin:Slow"}}, modules={"slow_plugin": SLOW_PLUGIN})
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer_core", "run", "--dataset", "fake", "--epochs", "50", "--batch-size", "8",
         "--device", "cpu", "--plugins", "slow,no:progress", "--run-dir", "run"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(folder)},
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert f"fit end: received {signal.Signals(signum).name}" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["epochs"] < 50


def test_an_unused_hook_is_not_called_per_step():
    trainer = run_tiny(fit=False)
    trainer.fit()
    assert all(trainer._hot[name] is None for name in ("on_batch_start", "on_batch_end", "on_before_backward"))


def test_training_throughput_is_recorded(tmp_path):
    run_tiny(run_dir=tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["samples_per_s"] > 0 and summary["steps"] == 6
    assert summary["best"]["val/acc"]["value"] == max(
        json.loads(line)["val/acc"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    assert summary["versions"]["torch"] == torch.__version__


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])  # (CUDA graphs need a GPU: on the CPU the mode only has to work)
def test_compile_trains_and_reports_compile_time_apart(tmp_path, mode):
    trainer = run_tiny(compile=True, compile_mode=mode, epochs=3, run_dir=tmp_path / "run")
    assert trainer.forward_model is not trainer.model  # the compiled wrapper runs the steps
    assert trainer.state.metrics["val/acc"] >= 0.9
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["compile_seconds"] > 0 and summary["train_seconds"] > 0
    assert run_tiny(run_dir=tmp_path / "eager").state.compile_seconds == 0.0  # only a compiled run has one


def test_a_skipped_last_batch_still_steps_the_accumulated_gradients():
    from trainer_core.data import epoch_order

    data = tiny_data()
    inputs = data.train.inputs.clone()
    inputs[epoch_order(48, 0, 1)[40]] = float("nan")  # in epoch 1's last batch of 16
    poisoned = DataBundle(TensorSplit(inputs, data.train.targets), data.val, data.classes, data.input_shape)
    trainer = run_tiny(data=poisoned, nonfinite="skip", accumulate_grad_batches=4, epochs=1)
    # Batches 1 and 2 were accumulated; the skipped third ends the epoch with their step, leaving no gradient behind.
    assert trainer.stepper.skipped == 1
    assert all(p.grad is None for p in trainer.model.parameters())


def test_evaluating_mid_epoch_keeps_training_modes():
    seen = []

    class EvaluateEarly:
        @hookimpl
        def on_batch_end(self, trainer, batch_idx):
            if batch_idx == 0:
                trainer.model[1].eval()  # a layer a plugin keeps in eval mode, like frozen batch norm
                trainer.evaluate()

        @hookimpl
        def on_batch_start(self, trainer, batch_idx):
            seen.append((batch_idx, trainer.model.training, trainer.model[1].training))

    run_tiny({"early": EvaluateEarly()}, epochs=1)
    assert seen[1:] == [(1, True, False), (2, True, False)]


def test_a_stop_s_status_is_one_summary_json_knows() -> None:
    trainer = run_tiny(fit=False)
    with pytest.raises(ValueError, match="a stop's status is 'stopped' or 'pruned'"):
        trainer.request_stop("why", status="done")
    trainer.request_stop("a sweep's pruner", status="pruned")
    assert trainer.stop_status == "pruned" and trainer.state.should_stop
