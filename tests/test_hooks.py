"""Each hook, exercised in isolation on a real tiny run."""

import json

import pytest
import torch

from trainer_core import PluginError, TrainerError, UsageError, hookimpl
from trainer_core.testing import HookRecorder, run_tiny


class Probe:
    """Calls ``fn(**kwargs)`` from one hook; a way to write a one-hook plugin inline."""

    def __init__(self, hook, fn):
        setattr(self, hook, hookimpl(specname=hook)(fn))


def probe(hook, fn):
    return Probe(hook, fn)


def test_hook_on_setup():
    """Runs before the optimizer exists and can freeze."""
    seen = {}

    def freeze_first_layer(trainer):
        seen["optimizer"] = trainer.optimizer
        for p in trainer.model[1].parameters():
            p.requires_grad_(False)

    trainer = run_tiny({"freezer": probe("on_setup", freeze_first_layer)})
    assert seen["optimizer"] is None
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in trainer.model[1].parameters())
    assert all(id(p) in in_optimizer for p in trainer.model[3].parameters())


def test_hook_on_fit_start():
    """Sees the optimizer and its usage errors pass through."""
    seen = []
    run_tiny({"p": probe("on_fit_start", lambda trainer: seen.append(trainer.optimizer))})
    assert isinstance(seen[0], torch.optim.Optimizer)

    def refuse(trainer):
        raise UsageError("p.metric 'val/nope' is never produced")

    with pytest.raises(UsageError, match="val/nope"):
        run_tiny({"p": probe("on_fit_start", refuse)})


def test_hook_on_epoch_start():
    """Counts from one in train mode."""
    seen = []
    run_tiny({"p": probe("on_epoch_start", lambda trainer, epoch: seen.append((epoch, trainer.model.training)))},
             epochs=3)
    assert seen == [(1, True), (2, True), (3, True)]


def test_hook_on_batch_start():
    """Gets every batch on the device."""
    seen = []
    trainer = run_tiny({"p": probe("on_batch_start", lambda batch_idx, inputs, targets: seen.append(
        (batch_idx, tuple(inputs.shape), inputs.dtype, len(targets))))}, batch_size=20)
    # 48 training samples in batches of 20: 20, 20, 8, each epoch.
    assert seen == [(0, (20, 1, 4, 4), torch.float32, 20), (1, (20, 1, 4, 4), torch.float32, 20),
                    (2, (8, 1, 4, 4), torch.float32, 8)] * 2
    assert trainer.state.step == 6


def test_hook_on_before_backward():
    """Gets the live loss before gradients exist."""
    seen = []

    def check(trainer, loss):
        seen.append((loss.requires_grad, all(p.grad is None for p in trainer.model.parameters())))

    run_tiny({"p": probe("on_before_backward", check)})
    assert seen and all(requires_grad and no_grads for requires_grad, no_grads in seen)


def test_hook_on_before_optimizer_step():
    """Sees complete gradients it can change."""
    def zero_gradients(optimizer):
        for group in optimizer.param_groups:
            for p in group["params"]:
                assert p.grad is not None
                p.grad.zero_()

    before = run_tiny(fit=False, optimizer="sgd", momentum=0.0)
    initial = [p.detach().clone() for p in before.model.parameters()]
    trainer = run_tiny({"zero": probe("on_before_optimizer_step", zero_gradients)}, optimizer="sgd", momentum=0.0)
    # Plain SGD with zeroed gradients never moves a weight.
    assert all(torch.equal(a, b) for a, b in zip(initial, trainer.model.parameters()))


def test_hook_on_batch_end():
    """Reports the step it follows."""
    seen = []

    def check(trainer, batch_idx, targets, outputs, loss):
        expected = torch.nn.functional.cross_entropy(outputs, targets)
        seen.append((trainer.state.step, batch_idx, outputs.requires_grad, torch.allclose(loss, expected)))

    run_tiny({"p": probe("on_batch_end", check)})
    assert seen == [(1, 0, False, True), (2, 1, False, True), (3, 2, False, True),
                    (4, 0, False, True), (5, 1, False, True), (6, 2, False, True)]


def test_hook_on_train_log():
    """Reports weighted interval means."""
    losses, logs = [], []
    recorder = probe("on_batch_end", lambda loss, targets: losses.append((loss.item(), len(targets))))
    logger = probe("on_train_log", lambda metrics: logs.append(dict(metrics)))
    run_tiny({"losses": recorder, "logs": logger}, batch_size=20, log_every_n_steps=2, epochs=1)
    # Batches of 20, 20, 8: one report after two steps, one for the epoch's last partial interval.
    assert [m["train/samples"] for m in logs] == [40.0, 8.0]
    first = (losses[0][0] * 20 + losses[1][0] * 20) / 40
    assert logs[0]["train/loss"] == pytest.approx(first, rel=1e-6)
    assert logs[1]["train/loss"] == pytest.approx(losses[2][0], rel=1e-6)
    assert logs[0]["lr"] == pytest.approx(0.05)


def test_hook_on_eval_start():
    """Finds the model in eval mode."""
    seen = []
    run_tiny({"p": probe("on_eval_start", lambda trainer: seen.append(trainer.model.training))})
    assert seen == [False, False]


def test_hook_on_eval_batch():
    """Covers the validation split without gradients."""
    seen = []

    def collect(targets, outputs):
        seen.append((torch.is_grad_enabled(), len(targets), (outputs.argmax(1) == targets).sum().item()))

    trainer = run_tiny({"p": probe("on_eval_batch", collect)}, epochs=1)
    assert not any(grad for grad, _, _ in seen)
    assert sum(n for _, n, _ in seen) == 24
    assert sum(c for _, _, c in seen) / 24 == trainer.state.metrics["val/acc"]


def test_hook_collect_eval_metrics(tmp_path):
    """Are merged and written."""
    seen = []
    producer = probe("collect_eval_metrics", lambda trainer: {"val/custom": trainer.state.epoch * 10})
    consumer = probe("on_eval", lambda metrics: seen.append(metrics["val/custom"]))
    run_tiny({"producer": producer, "consumer": consumer}, run_dir=tmp_path / "run")
    assert seen == [10.0, 20.0]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val/custom"] for r in records] == [10.0, 20.0]


def test_duplicate_collected_metric_names_are_an_error_naming_both():
    one = probe("collect_eval_metrics", lambda: {"val/x": 1.0})
    two = probe("collect_eval_metrics", lambda: {"val/x": 2.0})
    with pytest.raises(PluginError, match=r"'val/x' is produced by both plugin '(one|two)' and plugin '(one|two)'"):
        run_tiny({"one": one, "two": two})
    with pytest.raises(PluginError, match="'val/acc' is produced by both the task 'classification' and plugin 'thief'"):
        run_tiny({"thief": probe("collect_eval_metrics", lambda: {"val/acc": 1.0})})


def test_hook_on_eval():
    """Gets the merged metrics also in state."""
    seen = []
    trainer = run_tiny({"p": probe("on_eval", lambda trainer, metrics: seen.append((dict(metrics), trainer.state.metrics)))})
    assert [m["epoch"] for m, _ in seen] == [1, 2]
    assert set(seen[-1][0]) == {"epoch", "step", "train/loss", "val/loss", "val/acc"}
    assert seen[-1][0] == seen[-1][1] == trainer.state.metrics
    assert trainer.state.history == [m for m, _ in seen]


def test_hook_on_epoch_end(tmp_path):
    """Can stop the run."""
    def stop_after_two(trainer, epoch):
        if epoch == 2:
            trainer.request_stop("enough")

    trainer = run_tiny({"p": probe("on_epoch_end", stop_after_two)}, epochs=5, run_dir=tmp_path / "run")
    assert trainer.state.epoch == 2 and trainer.state.stop_reason == "enough"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["epochs"] == 2 and summary["stop_reason"] == "enough"


def test_hook_on_fit_end():
    """Runs once last (only on_run_end follows) and not after an exception."""
    recorder = HookRecorder()
    run_tiny({"rec": recorder})
    assert recorder.names().count("on_fit_end") == 1 and recorder.names()[-2:] == ["on_fit_end", "on_run_end"]

    recorder = HookRecorder()
    with pytest.raises(PluginError):
        run_tiny({"rec": recorder, "boom": probe("on_epoch_start", lambda: 1 / 0)})
    assert "on_fit_end" not in recorder.names() and recorder.names()[-2:] == ["on_exception", "on_run_end"]


def test_hook_on_exception(tmp_path):
    """Tells every plugin and names the culprit."""
    recorder = HookRecorder()

    def explode(batch_idx):
        if batch_idx == 1:
            raise RuntimeError("sensor offline")

    def clumsy(exception):
        raise ValueError("cleanup failed too")

    with pytest.raises(PluginError, match="plugin 'boom' failed in on_batch_end: RuntimeError: sensor offline") as info:
        run_tiny({"rec": recorder, "boom": probe("on_batch_end", explode), "clumsy": probe("on_exception", clumsy)},
                 run_dir=tmp_path / "run")
    assert isinstance(info.value.__cause__, RuntimeError)
    (exc_call,) = recorder.kwargs("on_exception")
    assert isinstance(exc_call["exception"], RuntimeError)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "sensor offline" in summary["error"]


def test_hook_on_run_end(tmp_path):
    """Comes last, after summary.json is written, with how the run ended; a failure in it changes nothing."""
    seen = []

    def report(trainer, status, summary):
        written = json.loads((tmp_path / "run" / "summary.json").read_text())
        seen.append((status, summary, written))
        raise ValueError("tracker offline")

    recorder = HookRecorder()
    run_tiny({"rec": recorder, "p": probe("on_run_end", report)}, run_dir=tmp_path / "run")
    (status, summary, written), = seen
    assert status == "completed" and summary["status"] == "completed" and written == json.loads(json.dumps(summary))
    assert recorder.names()[-2:] == ["on_fit_end", "on_run_end"]

    def explode(batch_idx):
        raise RuntimeError("sensor offline")

    seen.clear()
    with pytest.raises(PluginError, match="sensor offline"):
        run_tiny({"boom": probe("on_batch_end", explode), "p": probe("on_run_end", report)}, run_dir=tmp_path / "run")
    assert [(s, w["status"]) for s, _, w in seen] == [("failed", "failed")]
    without = []
    run_tiny({"p": probe("on_run_end", lambda status, summary: without.append((status, summary)))})
    assert without == [("completed", None)]  # no run folder, no summary
    # A summary.json that cannot be written (here a folder in its place): the run fails, and still ends its trackers.
    ended = []
    block = probe("on_fit_end", lambda trainer: (trainer.run_path / "summary.json").mkdir())
    with pytest.raises(TrainerError, match=r"cannot write .*summary.json"):
        run_tiny({"block": block, "p": probe("on_run_end", lambda status: ended.append(status))}, run_dir=tmp_path / "blocked")
    assert ended == ["completed"]


class Counter:
    def __init__(self):
        self.count = 0

    @hookimpl
    def on_batch_end(self):
        self.count += 1

    @hookimpl
    def plugin_state_dict(self):
        return {"count": self.count}

    @hookimpl
    def load_plugin_state(self, state):
        self.count = state["count"]


def test_hook_plugin_state_dict():
    """Is keyed by registered name."""
    first, second = Counter(), Counter()
    second.count = 100
    trainer = run_tiny({"first": first, "second": second})
    saved = trainer.checkpoint_state()["plugins"]
    assert saved == {"first": {"count": 6}, "second": {"count": 106}}


def test_hook_load_plugin_state():
    """Gives each plugin its own state."""
    first, second = Counter(), Counter()
    second.count = 100
    payload = run_tiny({"first": first, "second": second}, epochs=1).checkpoint_state()
    restored_first, restored_second, newcomer = Counter(), Counter(), Counter()
    newcomer.count = -1
    trainer = run_tiny({"first": restored_first, "second": restored_second, "newcomer": newcomer}, epochs=2, fit=False)
    trainer.resume = payload
    trainer.fit()
    # Resumed after epoch 1 (3 steps), then epoch 2 adds 3 more steps to each.
    assert (restored_first.count, restored_second.count) == (6, 106)
    assert newcomer.count == 2  # saved nothing: started from its own state, saw epoch 2 only
