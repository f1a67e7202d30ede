"""The whole-step CUDA graph mode (trainer_core.graphstep) as far as a CPU can check it: when a run
must stay eager and the one line that says why, and the steps the graphs would hold, run eagerly on
the same static buffers and index draw, against the eager loop (bit for bit).  Capturing and
replaying are checked in test_graphstep_gpu.py, on a CUDA machine."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.utils.data import TensorDataset

from trainer_core_plugins.models.smallcnn import build as build_smallcnn
from trainer_core_plugins.steplr import StepLR
from test_resume import Kill, Logs, assert_same_run, plugins
from trainer_core import RunConfig, Trainer, hookimpl, load_checkpoint
from trainer_core.checkpointing import find_checkpoint
from trainer_core.cli import make_cli
from trainer_core.config import resolve_config
from trainer_core.data import DataBundle, TensorSplit
from trainer_core.errors import PluginError, UsageError
from trainer_core.graphstep import GraphStep, eager_reason, hooked_module, step_reason
from trainer_core.rundir import RunDir
from trainer_core.runtime import seed_everything
from trainer_core.testing import run_tiny, tiny_data, tiny_model


def uint8_images(train_size: int = 1606, shape: tuple[int, int, int] = (1, 8, 8), classes: int = 3) -> DataBundle:
    """Learnable uint8 images, normalised per batch by the trainer: the path GPU-resident datasets take.
    1,606 samples at batch 16 are 100 full steps and a partial one of 6."""
    generator = torch.Generator().manual_seed(0)
    patterns = torch.randint(0, 256, (classes, *shape), generator=generator)

    def split(size: int) -> TensorSplit:
        targets = torch.arange(size) % classes
        noise = torch.randint(-60, 61, (size, *shape), generator=generator)
        return TensorSplit((patterns[targets] + noise).clamp(0, 255).to(torch.uint8), targets)

    return DataBundle(split(train_size), split(48), [f"c{i}" for i in range(classes)], shape,
                      mean=(0.5,) * shape[0], std=(0.25,) * shape[0])


class StepLosses:
    """Every step's loss, read from one-step logging intervals (no on_batch_end: the loop then gets
    the graph's own buffers), and the learning rate each step ran with."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.lrs: list[float] = []

    @hookimpl
    def on_train_log(self, metrics: dict[str, float]) -> None:
        self.losses.append(metrics["train/loss"])
        self.lrs.append(metrics["lr"])


def train(graph: bool, extra: dict[str, object] | None = None, model: nn.Module | None = None,
          **settings: Any) -> tuple[Trainer, StepLosses]:
    """A real run on :func:`uint8_images`, eager or through :class:`GraphStep` with ``capture=False``."""
    record = StepLosses()
    data = settings.pop("data", None) or uint8_images()
    settings = {"epochs": 1, "log_every_n_steps": 1, **settings}
    trainer = run_tiny({"losses": record, **(extra or {})}, data=data, model=model, fit=False, **settings)
    if graph:
        trainer.graph_step = GraphStep(trainer, capture=False)
    trainer.fit()
    return trainer, record


def same_weights(a: Trainer, b: Trainer) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


# -- when the run stays eager ---------------------------------------------------


def test_a_cpu_run_stays_eager_and_says_why_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="trainer_core"):
        trainer = run_tiny(cuda_graph=True)
    assert [r.getMessage() for r in caplog.records] == ["cuda-graph: the device is cpu, not a CUDA GPU; running eager"]
    assert trainer.graph_step is None and trainer.state.metrics["val/acc"] >= 0.9
    assert eager_reason(trainer) == "the device is cpu, not a CUDA GPU"


class BeforeBackward:
    @hookimpl
    def on_before_backward(self) -> None:
        pass


class BeforeStep:
    @hookimpl
    def on_before_optimizer_step(self) -> None:
        pass


@pytest.mark.parametrize(("settings", "reason"), [
    ({"compile": True}, "--compile captures graphs of its own (--compile-mode reduce-overhead); use one or the other"),
    ({"accumulate_grad_batches": 2}, "accumulate_grad_batches = 2 steps the optimizer only every few batches"),
    ({"nonfinite": "skip"}, "nonfinite = skip reads every loss back to the host"),
    ({"precision": "16"}, "precision 16's gradient scaler reads back to the host every step"),
    ({"batch_size": 64}, "the training split (48 samples) is smaller than one batch (64)"),
    ({"plugins": BeforeBackward()},
     "plugin 'watch' implements on_before_backward, which runs host code inside the step"),
    ({"plugins": BeforeStep()},
     "plugin 'watch' implements on_before_optimizer_step, which runs host code inside the step"),
    ({"data": "loader"}, "the training split is read through a DataLoader, not held in memory"),
    ({"data": "augment"}, "the training split augments each batch (random crops and flips) outside the step"),
])
def test_each_reason_to_stay_eager_is_named(settings: dict[str, Any], reason: str) -> None:
    extra = {"watch": settings.pop("plugins")} if "plugins" in settings else None
    data = settings.pop("data", None)
    if data:  # a Dataset (as file-backed ones are), not tensors in memory; or tensors with an augmentation
        tensors = tiny_data()
        train = (TensorSplit(tensors.train.inputs, tensors.train.targets, augment=lambda x, index, generator: x)
                 if data == "augment" else TensorDataset(tensors.train.inputs, tensors.train.targets))
        settings["data"] = DataBundle(train, tensors.val, tensors.classes, tensors.input_shape)
        settings["num_workers"] = 0
    trainer = run_tiny(extra, fit=False, **settings)
    assert step_reason(trainer) == reason
    assert eager_reason(trainer) == "the device is cpu, not a CUDA GPU"  # the device is named first
    with pytest.raises(UsageError) as refused:
        GraphStep(trainer, capture=False)
    assert str(refused.value) == f"cannot replay this run's steps from CUDA graphs: {reason}"


def test_capturing_needs_a_cuda_device() -> None:
    with pytest.raises(UsageError, match=r"^CUDA graphs need a CUDA device, not cpu \(capture=False runs the steps eagerly\)$"):
        GraphStep(run_tiny(fit=False), capture=True)


def test_a_module_with_hooks_is_named() -> None:
    model = tiny_model()
    assert hooked_module(model) is None
    model[1].register_forward_hook(lambda *args: None)
    assert hooked_module(model) == "1"
    model[1]._forward_hooks.clear()
    model.register_full_backward_hook(lambda *args: None)
    assert hooked_module(model) == "Sequential"


def test_cli_option_and_config_setting(tmp_path: Path) -> None:
    assert RunConfig().cuda_graph is False
    config_file = tmp_path / "run.toml"
    config_file.write_text("cuda_graph = true\n")
    assert resolve_config(config_file).cuda_graph is True
    assert resolve_config(config_file).to_toml()["cuda_graph"] is True
    result = CliRunner().invoke(make_cli(), ["run", "--cuda-graph", "--dataset", "fake", "--epochs", "1", "--device", "cpu",
                                             "--run-dir", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == ["warning: cuda-graph: the device is cpu, not a CUDA GPU; running eager"]
    assert "cuda_graph = true" in (tmp_path / "run" / "config.toml").read_text()


# -- the steps the graphs hold, run eagerly: the same as the loop's ----------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_100_steps_give_the_eager_loops_losses_bit_for_bit(optimizer: str) -> None:
    eager, eager_losses = train(False, optimizer=optimizer, weight_decay=0.01)
    graph, graph_losses = train(True, optimizer=optimizer, weight_decay=0.01)
    assert len(graph_losses.losses) == 101  # 100 full batches and the epoch's last, partial one
    assert graph_losses.losses == eager_losses.losses
    assert same_weights(eager, graph)
    assert graph.optimizer.state_dict()["param_groups"] == eager.optimizer.state_dict()["param_groups"]


@pytest.mark.slow
def test_a_cnn_with_dropout_channels_last_and_clipping_matches_too() -> None:
    def cnn() -> nn.Module:
        seed_everything(0)
        return build_smallcnn((3, 8, 8), 3, width=4)

    settings = dict(data=uint8_images(shape=(3, 8, 8)), channels_last=True, clip_grad_norm=0.5, epochs=2)
    eager, eager_losses = train(False, model=cnn(), **settings)
    graph, graph_losses = train(True, model=cnn(), **settings)
    assert graph.graph_step is not None and graph.graph_step.inputs.is_contiguous(memory_format=torch.channels_last)
    assert graph_losses.losses == eager_losses.losses and len(graph_losses.losses) == 202
    assert same_weights(eager, graph)


@pytest.mark.parametrize(("optimizer", "interval"), [("sgd", "step"), ("adam", "step"), ("sgd", "epoch")])
def test_steplr_changes_reach_the_step(optimizer: str, interval: str) -> None:
    settings: dict[str, Any] = dict(optimizer=optimizer, lr=0.05)
    if interval == "epoch":
        settings.update(data=uint8_images(train_size=160), epochs=4)  # 10 steps an epoch
    runs = [train(graph, {"steplr": StepLR(step_size=1 if interval == "epoch" else 25, gamma=0.5, interval=interval)},
                  **settings) for graph in (False, True)]
    (eager, eager_losses), (graph, graph_losses) = runs
    assert graph_losses.lrs == eager_losses.lrs and len(set(graph_losses.lrs)) >= 4  # the rate did change
    assert graph_losses.losses == eager_losses.losses
    assert same_weights(eager, graph)


class Seen:
    """What on_batch_start and on_batch_end are given; on_batch_end's tensors are kept as they are."""

    def __init__(self) -> None:
        self.starts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.ends: list[tuple[torch.Tensor, ...]] = []
        self.stepped: list[bool] = []

    @hookimpl
    def on_batch_start(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.starts.append((inputs.clone(), targets.clone()))

    @hookimpl
    def on_batch_end(self, inputs: torch.Tensor, targets: torch.Tensor, outputs: torch.Tensor, loss: torch.Tensor,
                     optimizer_stepped: bool) -> None:
        self.ends.append((inputs, targets, outputs, loss))  # kept past the step, as tensorboard keeps outputs
        self.stepped.append(optimizer_stepped)


def test_hooks_between_steps_see_what_they_see_eagerly_and_may_keep_it() -> None:
    eager_seen, graph_seen = Seen(), Seen()
    train(False, {"seen": eager_seen})
    graph, _ = train(True, {"seen": graph_seen})
    assert len(graph_seen.starts) == len(graph_seen.ends) == 101
    for (a, b), (c, d) in zip(eager_seen.starts, graph_seen.starts):
        assert torch.equal(a, c) and torch.equal(b, d)
    for eager_end, graph_end in zip(eager_seen.ends, graph_seen.ends):
        assert all(torch.equal(x, y) for x, y in zip(eager_end, graph_end))  # not overwritten by later steps
    assert graph_seen.stepped == [True] * 101
    assert graph.graph_step is not None and graph_seen.starts[0][0].shape == graph.graph_step.inputs.shape


def resumable(run_dir: Path, extra: dict[str, object], resume: bool = False) -> Trainer:
    """test_resume's run (steplr, freeze, checkpoint, dropout; 3 steps an epoch) through GraphStep."""
    config = RunConfig(epochs=3, batch_size=16, lr=0.05, device="cpu", plugins={}, model="tiny", dataset="tiny",
                       log_every_n_steps=2)
    seed_everything(config.seed)
    payload = load_checkpoint(find_checkpoint(run_dir)) if resume else None
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    trainer = Trainer(model, tiny_data(train_size=40), config, plugins=extra,
                      run_dir=RunDir.create(run_dir, resume=resume, overwrite=not resume), resume=payload)
    trainer.graph_step = GraphStep(trainer, capture=False)
    trainer.fit()
    return trainer


def test_a_mid_epoch_resume_continues_exactly(tmp_path: Path) -> None:
    """40 samples at batch 16: two full batches and a partial one; killed after the first of epoch 2."""
    reference_logs = Logs()
    reference = resumable(tmp_path / "straight", {**plugins(), "logs": reference_logs})
    with pytest.raises(PluginError, match="plugin 'kill' failed in on_batch_end"):
        resumable(tmp_path / "run", {**plugins(every_n_steps=2), "kill": Kill(5)})
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["state"]["step"] == 4
    logs = Logs()
    resumed = resumable(tmp_path / "run", {**plugins(every_n_steps=2), "logs": logs}, resume=True)
    assert len(resumed.optimizer.param_groups) == 2  # freeze's unfreezing added one mid-run
    assert_same_run(reference, resumed)
    assert logs.seen == [entry for entry in reference_logs.seen if entry[0] >= 5]
