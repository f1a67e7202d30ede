"""tensorboard: logs proven by TensorBoard's own reader and a real server."""

from __future__ import annotations

import copy
import io
import json
import logging
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util
from torch import nn
from torch.utils.tensorboard.summary import compute_curve

from trainer_core_plugins.class_accuracy import ClassAccuracy
from trainer_core_plugins.tensorboard import PR_THRESHOLDS, TensorBoard
from trainer_core import PluginError, UsageError, hookimpl
from trainer_core_plugins.tensorboard_pictures import confusion_geometry
from trainer_core.cli import make_cli
from trainer_core.data import DataBundle, TensorSplit
from trainer_core.testing import HookRecorder, run_tiny, tiny_model
from trainer_core.trainer import Trainer


def read_events(folder: Path) -> event_accumulator.EventAccumulator:
    """Everything in ``folder``'s event files (size guidance 0: keep all)."""
    reader = event_accumulator.EventAccumulator(str(folder), size_guidance={k: 0 for k in event_accumulator.DEFAULT_SIZE_GUIDANCE})
    reader.Reload()
    return reader


def scalars(reader: event_accumulator.EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in reader.Scalars(tag)]


def metrics_records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def quiet_class_accuracy() -> ClassAccuracy:
    plugin = ClassAccuracy()
    plugin.stream = io.StringIO()
    return plugin


class GradSnapshots:
    """Copies of the gradients each optimizer step is about to apply, by step."""

    def __init__(self) -> None:
        self.grads: dict[int, dict[str, torch.Tensor]] = {}

    @hookimpl
    def on_before_optimizer_step(self, trainer: Trainer) -> None:
        self.grads[trainer.state.step + 1] = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


class Finished:
    """A finished tiny run: 3 steps an epoch, 2 epochs, a training log every 2 steps."""

    def __init__(self, root: Path) -> None:
        self.run = root / "run"
        self.recorder = HookRecorder()
        self.snapshots = GradSnapshots()
        self.trainer = run_tiny(
            {"tensorboard": TensorBoard(histogram_every_n_steps=None, train_accuracy=True), "class-accuracy": quiet_class_accuracy(),
             "recorder": self.recorder,
             "grads": self.snapshots},
            run_dir=self.run, log_every_n_steps=2,
        )
        self.events = read_events(self.run)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Finished:
    return Finished(tmp_path_factory.mktemp("tensorboard"))


def test_training_scalars_at_each_logging_interval(finished: Finished) -> None:
    logged = [kwargs["metrics"] for kwargs in finished.recorder.kwargs("on_train_log")]
    losses = scalars(finished.events, "train/loss")
    assert [step for step, _ in losses] == [2, 3, 5, 6]  # intervals, and each epoch's partial one
    assert [value for _, value in losses] == pytest.approx([m["train/loss"] for m in logged], rel=1e-6)
    assert scalars(finished.events, "lr/group0") == [(step, pytest.approx(0.05)) for step in (2, 3, 5, 6)]

    # Training accuracy of each interval, counted here from the batches the hooks saw.
    expected, right, seen = [], 0, 0
    for name, kwargs in finished.recorder.calls:
        if name == "on_batch_end":
            right += int((kwargs["outputs"].argmax(dim=1) == kwargs["targets"]).sum())
            seen += len(kwargs["targets"])
        elif name == "on_train_log":
            expected.append(right / seen)
            right, seen = 0, 0
    assert [value for _, value in scalars(finished.events, "train/acc")] == pytest.approx(expected, rel=1e-6)


def test_every_evaluation_metric_equals_metrics_jsonl(finished: Finished) -> None:
    records = metrics_records(finished.run)
    assert [r["step"] for r in records] == [3, 6]
    keys = ["val/loss", "val/acc", "val/acc/class0", "val/acc/class1", "val/acc/class2"]
    for key in keys:
        assert scalars(finished.events, key) == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in records]
    # The evaluation's epoch-mean training loss must not collide with the interval means.
    assert scalars(finished.events, "train/loss_epoch") == [(r["step"], pytest.approx(r["train/loss"], rel=1e-6)) for r in records]


def test_graph_and_one_image_grid(finished: Finished) -> None:
    assert any("Linear" in node.name for node in finished.events.Graph().node)
    grids = finished.events.Images("images/val_batch")
    assert [event.step for event in grids] == [3]  # once, at the first evaluation, not per epoch
    # The 24 validation images of 4x4 (fewer than tensorboard.images), 8 a row, 2 pixels of padding.
    assert (grids[0].width, grids[0].height) == (8 * 6 + 2, 3 * 6 + 2)


def test_confusion_matrix_image_from_class_accuracy(finished: Finished) -> None:
    from PIL import Image

    images = finished.events.Images("class-accuracy/confusion")
    assert [event.step for event in images] == [3, 6]
    pixels = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB")).astype(float)
    classes = ["class0", "class1", "class2"]
    left, top, cell = confusion_geometry(classes)
    assert pixels.shape == (top + 3 * cell + 4, left + 3 * cell + 4, 3)
    plugin = finished.trainer.pm.get_plugin("class-accuracy")
    shares = (plugin.confusion / plugin.confusion.sum(dim=1, keepdim=True)).numpy()
    corners = pixels[top + 3 :: cell, left + 3 :: cell][:3, :3]  # inside each cell, clear of its count
    np.testing.assert_allclose(corners[..., 0], 255 * (1 - shares), atol=1.5)
    assert (corners[..., 2] == 255).all()
    # Each row and column is named, and the axes are titled: text left of and above the cells.
    ink = pixels.sum(axis=2) < 3 * 128
    for k in range(3):
        assert ink[top + k * cell : top + (k + 1) * cell, :left - 4].any()  # the row's class name
        assert ink[:top - 4, left + k * cell : left + (k + 1) * cell].any()  # the column's, sideways
    assert ink[:14, left:].any() and ink[top:, :14].any()  # "predicted class" above, "true class" at the left


def test_pr_curves_of_the_last_evaluation_from_true_labels(finished: Finished) -> None:
    trainer = finished.trainer
    with torch.no_grad():
        outputs, targets = zip(*((trainer.model(x), y) for x, y in trainer.val_batches.iterate()))
    probs, labels = torch.cat(outputs).softmax(dim=1), torch.cat(targets)
    for index in range(3):
        events = finished.events.Tensors(f"pr/class{index}")
        assert [event.step for event in events] == [3, 6]
        logged = tensor_util.make_ndarray(events[-1].tensor_proto)
        expected = compute_curve(labels=(labels == index).numpy(), predictions=probs[:, index].numpy(), num_thresholds=PR_THRESHOLDS)
        np.testing.assert_allclose(logged, expected, rtol=1e-6, atol=1e-6)


def test_pr_curves_use_true_labels_not_predictions(tmp_path: Path) -> None:
    trainer = run_tiny(fit=False)
    plugin = TensorBoard(log_dir=tmp_path / "tb", images=0, graph=False)
    plugin.on_fit_start(trainer=trainer)
    plugin.on_eval_start(trainer=trainer)
    generator = torch.Generator().manual_seed(1)
    targets = torch.arange(30) % 3
    outputs = torch.randn(30, 3, generator=generator)
    outputs[torch.arange(30), (targets + 1) % 3] += 4.0  # the model is wrong about almost every sample
    for first, last in ((0, 16), (16, 30)):  # a full and a partial batch
        plugin.on_eval_batch(trainer=trainer, inputs=outputs[first:last], targets=targets[first:last], outputs=outputs[first:last])
    trainer.state.step = 7
    plugin.on_eval(trainer=trainer, metrics={"epoch": 1, "step": 7, "val/acc": 0.0})
    plugin.on_fit_end(trainer=trainer)

    reader = read_events(tmp_path / "tb")
    probs, predictions = outputs.softmax(dim=1), outputs.argmax(dim=1)
    assert (predictions != targets).float().mean() > 0.5
    for index in range(3):
        logged = tensor_util.make_ndarray(reader.Tensors(f"pr/class{index}")[0].tensor_proto)
        truth = compute_curve(labels=(targets == index).numpy(), predictions=probs[:, index].numpy(), num_thresholds=PR_THRESHOLDS)
        seed_bug = compute_curve(labels=(predictions == index).numpy(), predictions=probs[:, index].numpy(), num_thresholds=PR_THRESHOLDS)
        np.testing.assert_allclose(logged, truth, rtol=1e-6, atol=1e-6)
        assert not np.allclose(logged, seed_bug)


def test_importing_the_plugins_does_not_import_torch() -> None:
    # `trainer plugins` and `trainer --help` import plugin modules: they must stay fast.
    code = "import sys, trainer_core_plugins.tensorboard, trainer_core_plugins.class_accuracy; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorboard')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_model_with_the_wrong_number_of_outputs_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="tensorboard: the model gives 5 scores per sample but the dataset has 3 classes"):
        run_tiny({"tensorboard": TensorBoard(images=0, graph=False, log_dir=tmp_path / "events")}, model=tiny_model(num_classes=5),
                 run_dir=tmp_path / "run", epochs=1)
    assert read_events(tmp_path / "events").Scalars("train/loss")  # the writer was closed and flushed
    assert not (tmp_path / "run").exists()  # refused before the run kept anything: the folder it made goes (issue 15)


def test_histograms_at_each_epoch_end_with_none(finished: Finished) -> None:
    model = finished.trainer.model
    params = dict(model.named_parameters())
    assert {f"weights/{name}" for name in params} | {f"grads/{name}" for name in params} == set(finished.events.Tags()["histograms"])
    for name, param in params.items():
        # After the run the parameters are those of the last step.
        for kind, tensor in (("weights", param), ("grads", finished.snapshots.grads[6][name])):
            events = finished.events.Histograms(f"{kind}/{name}")
            assert [event.step for event in events] == [3, 6]
            last = events[-1].histogram_value
            assert last.num == tensor.numel()
            assert (last.min, last.max) == (pytest.approx(tensor.min().item()), pytest.approx(tensor.max().item()))
            assert last.sum == pytest.approx(tensor.sum().item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    ("every", "accumulate", "steps"),
    # 3 steps an epoch.  Accumulating 2 batches, the optimizer steps at steps 2, 3, 5 and 6:
    # step 4 has no update, so the update at 5 takes its histograms.
    [(2, 1, [2, 4, 6]), (0, 1, []), (2, 2, [2, 5, 6]), (3, 2, [3, 6])],
)
def test_histogram_interval_option(tmp_path: Path, every: int, accumulate: int, steps: list[int]) -> None:
    plugin = TensorBoard(histogram_every_n_steps=every, images=0, graph=False, pr_curves=False)
    run_tiny({"tensorboard": plugin}, run_dir=tmp_path / "run", accumulate_grad_batches=accumulate)
    reader = read_events(tmp_path / "run")
    if not steps:
        assert reader.Tags()["histograms"] == []
        return
    for tag in ("weights/1.weight", "grads/1.weight", "grads/3.bias"):
        assert [event.step for event in reader.Histograms(tag)] == steps


def test_hparams_with_final_metrics(finished: Finished) -> None:
    reader = plugin_event_accumulator.EventAccumulator(str(finished.run))
    reader.Reload()
    content = reader.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["lr"].number_value == pytest.approx(0.05)
    assert start.hparams["epochs"].number_value == 2
    assert start.hparams["optimizer"].string_value == finished.trainer.config.optimizer
    metric_tags = {info.name.tag for info in experiment.metric_infos}
    assert {"val/acc", "val/loss", "val/acc/class0", "train/loss_epoch"} <= metric_tags
    # Each hparams metric is a scalar of this run whose last value is the final metric.
    final = metrics_records(finished.run)[-1]
    assert scalars(finished.events, "val/acc")[-1][1] == pytest.approx(final["val/acc"])
    assert metric_tags <= set(finished.events.Tags()["scalars"])


def test_images_are_de_normalised(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (20, 3, 4, 4), dtype=torch.uint8, generator=generator)
    data = DataBundle(
        train=TensorSplit(raw, torch.arange(20) % 3), val=TensorSplit(raw[:6], torch.arange(6) % 3),
        classes=["a", "b", "c"], input_shape=(3, 4, 4), mean=(0.2, 0.5, 0.7), std=(0.3, 0.2, 0.1),
    )
    plugin = TensorBoard(images=5, graph=False, pr_curves=False, histogram_every_n_steps=0)
    run_tiny({"tensorboard": plugin}, data=data, run_dir=tmp_path / "run", epochs=1)
    (grid,) = read_events(tmp_path / "run").Images("images/val_batch")
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(grid.encoded_image_string)).convert("RGB")).astype(int)
    assert pixels.shape == (8, 5 * 6 + 2, 3)
    for k, image in enumerate(raw[:5]):  # one of each class in turn: here, the split's first images
        cell = pixels[2:6, 2 + 6 * k : 6 + 6 * k].transpose(2, 0, 1)
        assert np.abs(cell - image.numpy().astype(int)).max() <= 1  # the original pixel values


class Untraceable(nn.Module):
    """A model the tracer cannot follow (as with data-dependent Python control flow)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_model()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():
            raise RuntimeError("cannot trace this")
        return self.net(inputs)


def test_untraceable_model_warns_and_the_run_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    with caplog.at_level(logging.WARNING, logger="trainer_core"):
        run_tiny({"tensorboard": TensorBoard()}, model=Untraceable(), run_dir=tmp_path / "run")
    warnings = [r.getMessage() for r in caplog.records if r.name == "trainer_core"]
    assert any("cannot be traced" in m and "cannot trace this" in m for m in warnings)
    assert "Error occurs" not in capsys.readouterr().out  # add_graph's own print is kept off the console
    reader = read_events(tmp_path / "run")
    assert not reader.Tags()["graph"]
    assert len(reader.Scalars("val/acc")) == 2


def test_graph_and_images_do_not_change_training(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    plain = run_tiny(model=copy.deepcopy(model))
    logged = run_tiny({"tensorboard": TensorBoard()}, model=model, run_dir=tmp_path / "run")
    assert read_events(tmp_path / "run").Tags()["graph"]
    for (name, a), b in zip(plain.model.state_dict().items(), logged.model.state_dict().values()):
        assert torch.equal(a, b), name  # weights and batch-norm statistics


def test_no_run_folder_needs_log_dir(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="tensorboard has nowhere to write.*tensorboard.log_dir"):
        run_tiny({"tensorboard": TensorBoard()})
    run_tiny({"tensorboard": TensorBoard(log_dir=tmp_path / "logs")}, epochs=1)
    assert len(read_events(tmp_path / "logs").Scalars("val/acc")) == 1


def test_only_the_main_process_writes(tmp_path: Path) -> None:
    trainer = run_tiny({"tensorboard": TensorBoard()}, run_dir=tmp_path / "run", fit=False)
    trainer.rank = 1
    trainer.fit()
    assert not list((tmp_path / "run").glob("events.out.tfevents.*"))


def test_writer_closed_when_the_run_fails(tmp_path: Path) -> None:
    class Boom:
        @hookimpl
        def on_eval(self) -> None:
            raise RuntimeError("boom")

    plugin = TensorBoard()
    with pytest.raises(PluginError, match="boom"):
        run_tiny({"tensorboard": plugin, "boom": Boom()}, run_dir=tmp_path / "run", log_every_n_steps=1)
    assert plugin.writer is None
    assert [step for step, _ in scalars(read_events(tmp_path / "run"), "train/loss")] == [1, 2, 3]


def on_disk(folder: Path, tag: str, until: int = 1, timeout: float = 10.0) -> list[int]:
    """The steps of ``tag`` that TensorBoard's reader finds in ``folder``, waiting
    (up to ``timeout`` seconds) for the writer thread to put ``until`` of them there."""
    deadline = time.monotonic() + timeout
    while True:
        reader = read_events(folder)
        found = [step for step, _ in scalars(reader, tag)] if tag in reader.Tags()["scalars"] else []
        if len(found) >= until or time.monotonic() > deadline:
            return found


def test_training_scalars_reach_the_disk_mid_epoch_within_flush_secs(tmp_path: Path) -> None:
    # Scalars wait in memory between writes, but never longer than flush_secs.
    class SlowLogs:
        """Makes each training log take a second; at step 6, mid-epoch, looks at the files."""

        def __init__(self) -> None:
            self.seen_mid_epoch: list[int] = []

        @hookimpl(trylast=True)
        def on_train_log(self, trainer: Trainer) -> None:
            if trainer.state.step == 6:
                self.seen_mid_epoch = on_disk(trainer.run_path, "train/loss", until=2)
            elif trainer.state.step < 6:
                time.sleep(0.6)

    probe = SlowLogs()
    run_tiny({"tensorboard": TensorBoard(images=0, graph=False, flush_secs=1), "probe": probe},
             run_dir=tmp_path / "run", epochs=1, batch_size=4, log_every_n_steps=2)  # 12 steps in the epoch
    assert probe.seen_mid_epoch and probe.seen_mid_epoch[0] == 2 and max(probe.seen_mid_epoch) >= 4


def test_a_checkpoint_never_gets_ahead_of_the_event_file(tmp_path: Path) -> None:
    class Saver:
        def __init__(self) -> None:
            self.on_disk_at_save: list[int] = []

        @hookimpl
        def on_batch_end(self, trainer: Trainer, batch_idx: int) -> None:
            if batch_idx == 6:  # mid-epoch, flush_secs far away: the save itself must write them
                trainer.checkpoint_state()
                self.on_disk_at_save = on_disk(trainer.run_path, "train/loss", timeout=0)

    saver = Saver()
    run_tiny({"tensorboard": TensorBoard(images=0, graph=False), "saver": saver},
             run_dir=tmp_path / "run", epochs=1, batch_size=4, log_every_n_steps=2)
    assert saver.on_disk_at_save == [2, 4, 6]


def date_back(folder: Path) -> None:
    """TensorBoard reads event files in name order, and a name starts with the
    writer's start time in seconds: date the files in ``folder`` a minute back,
    as a later process would find them."""
    for old in folder.glob("events.out.tfevents.*"):
        stamp, rest = old.name.removeprefix("events.out.tfevents.").split(".", 1)
        old.rename(old.with_name(f"events.out.tfevents.{int(stamp) - 60}.{rest}"))


def test_resumed_run_replaces_the_events_after_its_checkpoint(tmp_path: Path) -> None:
    first = run_tiny({"tensorboard": TensorBoard(images=0, graph=False)}, run_dir=tmp_path / "run")
    date_back(tmp_path / "run")
    # Resume from a checkpoint taken after epoch 1 (step 3).
    checkpoint = first.checkpoint_state()
    history = checkpoint["state"]["history"][:1]
    checkpoint["state"].update(epoch=1, step=3, batch_idx=3, history=history, metrics=history[0])
    resumed = TensorBoard(log_dir=tmp_path / "run", images=0, graph=False)
    Trainer(first.model, first.data, first.config, plugins={"tensorboard": resumed}, resume=checkpoint).fit()
    steps = [step for step, _ in scalars(read_events(tmp_path / "run"), "val/acc")]
    assert steps == [3, 6]  # the first attempt's step-6 point was purged, not doubled


def test_overwritten_run_replaces_the_old_curves(tmp_path: Path) -> None:
    run_tiny({"tensorboard": TensorBoard(images=0, graph=False)}, run_dir=tmp_path / "run", epochs=3)
    date_back(tmp_path / "run")
    run_tiny({"tensorboard": TensorBoard(images=0, graph=False)}, run_dir=tmp_path / "run", lr=0.01)  # overwrites
    reader = read_events(tmp_path / "run")
    records = metrics_records(tmp_path / "run")
    assert scalars(reader, "val/loss") == [(r["step"], pytest.approx(r["val/loss"], rel=1e-6)) for r in records]
    assert [step for step, _ in scalars(reader, "train/loss")] == [3, 6]  # nothing left of the old run's epoch 3


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("tensorboard.images=-1", "tensorboard.images must be >= 0 (got -1)"),
        ("tensorboard.histogram_every_n_steps=-3", "tensorboard.histogram_every_n_steps must be >= 0 (got -3)"),
        ("tensorboard.flush_secs=0", "tensorboard.flush_secs must be >= 1 (got 0)"),
        ("tensorboard.graph=perhaps", "option tensorboard.graph='perhaps' is not a valid bool"),
    ],
)
def test_bad_options_are_one_line_usage_errors(tmp_path: Path, option: str, message: str) -> None:
    result = CliRunner().invoke(make_cli(), ["run", "--dataset", "fake", "--epochs", "1", "--plugins", "tensorboard",
                                             "-o", option, "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


BUILTINS = ["progress", "tensorboard", "class-accuracy", "steplr", "checkpoint", "freeze", "early-stopping"]


@pytest.mark.slow
def test_with_every_builtin_in_any_order(tmp_path: Path) -> None:
    orders = [BUILTINS, BUILTINS[::-1], BUILTINS[3:] + BUILTINS[:3]]
    options = ["-o", "steplr.step_size=1", "-o", "steplr.gamma=0.5", "-o", "freeze.unfreeze_at_epoch=2",
               "-o", "tensorboard.histogram_every_n_steps=none", "-o", "tensorboard.train_accuracy=true",
               "-o", "checkpoint.monitor=val/acc/class0", "-o", "checkpoint.restore_best=false"]
    results = []
    for index, order in enumerate(orders):
        run = tmp_path / f"run{index}"
        result = CliRunner().invoke(make_cli(), ["run", "--dataset", "fake", "--epochs", "2", "--plugins", ",".join(order),
                                                 *options, "--run-dir", str(run)])
        assert result.exit_code == 0, result.output
        assert "per-class accuracy (epoch 2):" in result.output
        reader = read_events(run)
        assert {"val/acc/class0", "val/acc/class1", "val/acc/class2", "train/loss", "train/acc"} <= set(reader.Tags()["scalars"])
        assert {"pr/class0", "pr/class1", "pr/class2"} <= set(reader.Tags()["tensors"])
        assert reader.Tags()["graph"] and reader.Tags()["images"] and reader.Tags()["histograms"]
        # steplr halves the rate each epoch; freeze adds a group for the unfrozen backbone at epoch 2.
        assert scalars(reader, "lr/group0") == [(3, pytest.approx(1e-3)), (6, pytest.approx(5e-4))]
        assert [step for step, _ in scalars(reader, "lr/group1")] == [6]
        assert "val/acc/class2" in json.loads((run / "summary.json").read_text())["final"]
        results.append((metrics_records(run), scalars(reader, "val/acc"), sorted(p.name for p in (run / "checkpoints").iterdir())))
    assert results[0] == results[1] == results[2]  # the order of --plugins changes nothing


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_real_tensorboard_server_serves_the_run(finished: Finished) -> None:
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "tensorboard"), "--logdir", str(finished.run.parent),
         "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"

    def get(path: str) -> Any:
        with urllib.request.urlopen(base + path, timeout=5) as response:
            return json.load(response)

    # The logs sit in the run folder, so pointed at the runs' folder the server names the run after it.
    name = finished.run.name
    try:
        tags: dict[str, Any] = {}
        deadline = time.monotonic() + 90
        while "val/acc" not in tags.get(name, {}):
            assert server.poll() is None, server.stderr.read().decode() if server.stderr else "server exited"
            assert time.monotonic() < deadline, f"no val/acc tag from the server in 90 s; last answer {tags}"
            try:
                tags = get("/data/plugin/scalars/tags")
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.5)
        assert {"train/loss", "train/acc", "lr/group0", "val/loss", "val/acc/class0"} <= set(tags[name])
        points = get(f"/data/plugin/scalars/scalars?run={name}&tag=val/acc")
        records = metrics_records(finished.run)
        assert [(step, value) for _, step, value in points] == [(r["step"], pytest.approx(r["val/acc"], rel=1e-6)) for r in records]
        # Every kind of record has data the server's dashboards recognise.
        listing = get("/data/plugins_listing")
        for dashboard in ("scalars", "images", "graphs", "histograms", "distributions", "pr_curves", "hparams"):
            assert listing[dashboard]["enabled"], dashboard
        assert {"pr/class0", "pr/class1", "pr/class2"} <= set(get("/data/plugin/pr_curves/tags")[name])
        request = urllib.request.Request(base + "/data/plugin/hparams/experiment", data=b'{"experimentName": ""}',
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            experiment = json.load(response)
        assert {"lr", "epochs", "batch_size"} <= {info["name"] for info in experiment["hparamInfos"]}
        # What runs are compared by comes first in the server's table (issue 18, item 6), momentum among them
        # (an SGD run beside this Adam one has it); the headline metric and the losses are the first columns.
        compared = ["batch_size", "lr", "momentum", "optimizer", "weight_decay"]
        assert [info["name"] for info in experiment["hparamInfos"][:5]] == compared
        assert [info["name"]["tag"] for info in experiment["metricInfos"][:3]] == ["val/acc", "val/loss", "train/loss_epoch"]
        request = urllib.request.Request(base + "/data/plugin/hparams/session_groups", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"experimentName": "", "allowedStatuses": ["STATUS_SUCCESS", "STATUS_UNKNOWN"],
                                                          "colParams": [], "startIndex": 0, "sliceSize": 10}).encode())
        with urllib.request.urlopen(request, timeout=5) as response:
            (group,) = json.load(response)["sessionGroups"]
        assert "momentum" not in group["hparams"] and group["hparams"]["optimizer"] == "adam"  # Adam has none
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def fabricated(seed: int, size: int = 25, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and logits, the same in every process."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, (size,), generator=generator), torch.randn(size, classes, generator=generator)


def shard_batches(rank: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's uneven shard (13 or 12 samples) in batches of 5."""
    targets, outputs = fabricated(seed)
    first, last = (0, 13) if rank == 0 else (13, 25)
    return [(targets[s : min(s + 5, last)], outputs[s : min(s + 5, last)]) for s in range(first, last, 5)]


def distributed_worker(rank: int, world_size: int, folder: str) -> None:
    """One process of a gloo group driving both plugins' hooks over its shard."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world_size)
    try:
        trainer = run_tiny(fit=False)
        trainer.rank = rank
        board = TensorBoard(log_dir=Path(folder) / "tb", images=0, graph=False, histogram_every_n_steps=0, train_accuracy=True)
        classes = ClassAccuracy(table=False)
        for plugin in (board, classes):
            plugin.on_fit_start(trainer=trainer)
        for targets, outputs in shard_batches(rank, seed=1):
            board.on_batch_end(trainer=trainer, targets=targets, outputs=outputs)
        trainer.state.step = 4
        board.on_train_log(trainer=trainer, metrics={"train/loss": 1.0, "train/samples": 13.0, "lr": 0.05})
        board.on_eval_start(trainer=trainer)
        classes.on_eval_start(trainer=trainer)
        for targets, outputs in shard_batches(rank, seed=2):
            board.on_eval_batch(trainer=trainer, inputs=outputs, targets=targets, outputs=outputs)
            classes.on_eval_batch(targets=targets, outputs=outputs)
        metrics = classes.collect_eval_metrics(trainer=trainer)
        board.collect_eval_metrics(trainer=trainer)
        board.on_eval(trainer=trainer, metrics={"epoch": 1, "step": 4, **metrics})
        board.on_fit_end(trainer=trainer)
        torch.save({"confusion": classes.confusion, "metrics": metrics}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_counts_are_summed_over_ranks(tmp_path: Path) -> None:
    """Two real gloo processes, each with an uneven shard: the confusion matrix,
    training accuracy and PR curves equal those of all samples; rank zero alone writes."""
    import torch.multiprocessing as mp

    mp.spawn(distributed_worker, args=(2, str(tmp_path)), nprocs=2)
    targets, outputs = fabricated(seed=2)
    expected = torch.zeros(3, 3, dtype=torch.int64)
    for target, prediction in zip(targets.tolist(), outputs.argmax(dim=1).tolist()):
        expected[target, prediction] += 1
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(saved["confusion"], expected)
        assert saved["metrics"] == {f"val/acc/class{i}": expected[i, i].item() / expected[i].sum().item() for i in range(3)}

    assert len(list((tmp_path / "tb").iterdir())) == 1  # one writer
    reader = read_events(tmp_path / "tb")
    train_targets, train_outputs = fabricated(seed=1)
    assert scalars(reader, "train/acc") == [(4, pytest.approx((train_outputs.argmax(dim=1) == train_targets).float().mean().item()))]
    probs = outputs.softmax(dim=1)
    for index in range(3):
        logged = tensor_util.make_ndarray(reader.Tensors(f"pr/class{index}")[0].tensor_proto)
        truth = compute_curve(labels=(targets == index).numpy(), predictions=probs[:, index].numpy(), num_thresholds=PR_THRESHOLDS)
        np.testing.assert_allclose(logged, truth, rtol=1e-6, atol=1e-6)


def test_training_accuracy_is_opt_in(tmp_path: Path) -> None:
    run_tiny({"tensorboard": TensorBoard(images=0, graph=False)}, run_dir=tmp_path / "run", log_every_n_steps=2)
    tags = set(read_events(tmp_path / "run").Tags()["scalars"])
    assert {"train/loss", "lr/group0", "val/acc"} <= tags and "train/acc" not in tags


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on an H200: both agree)")
def test_training_accuracy_under_cuda_graphs_is_the_eager_one(tmp_path: Path) -> None:
    # tensorboard keeps each batch's outputs until the interval's log; CUDA graphs replay into the
    # same buffers, so the trainer must hand plugins a copy (without it: "accessing tensor output
    # of CUDAGraphs that has been overwritten").
    def accuracies(name: str, **settings: Any) -> list[float]:
        run_tiny({"tensorboard": TensorBoard(train_accuracy=True)}, device="cuda", epochs=3, log_every_n_steps=2,
                 run_dir=tmp_path / name, **settings)
        return [value for _, value in scalars(read_events(tmp_path / name), "train/acc")]

    eager = accuracies("eager")
    graphed = accuracies("graphed", compile=True, compile_mode="reduce-overhead")
    assert len(graphed) == len(eager) == 6
    assert graphed == pytest.approx(eager, abs=0.1)
