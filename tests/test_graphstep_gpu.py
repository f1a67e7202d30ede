"""Capturing and replaying the whole training step (trainer_core.graphstep) on a CUDA device:
100 replayed steps against the eager loop, learning-rate changes, the runs that must go eager,
checkpoints and the throughput benchmark's graph case.  Skipped without CUDA (what a CPU can
check is in test_graphstep.py)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from torch import nn

# cuBLAS picks its reductions by workspace, which differs between streams unless fixed
# before its first use: the eager loop runs on the default stream, the graphs were
# captured on a side stream.  (Set at collection, before any test touches CUDA.)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from trainer_core_plugins.models.convnet import build as build_convnet  # noqa: E402
from trainer_core_plugins.steplr import StepLR  # noqa: E402
from test_graphstep import Seen, StepLosses, uint8_images  # noqa: E402
from trainer_core import hookimpl  # noqa: E402
from trainer_core.graphstep import GraphStep  # noqa: E402
from trainer_core.testing import run_tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the graphs are CUDA graphs")


@pytest.fixture(autouse=True)
def reproducible_cudnn() -> Iterator[None]:
    """cuDNN's default convolution gradients vary from run to run (BENCHMARKS.md): compare runs that do not."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def seed_cnn() -> nn.Module:
    torch.manual_seed(0)
    return build_convnet((3, 32, 32), 10)


def train(mode: str, extra: dict[str, object] | None = None, **settings: Any) -> tuple[Any, StepLosses]:
    """The seed CNN on GPU-resident uint8 images, batch 64: 100 full steps and a partial one of 10.
    ``mode``: ``eager`` (the loop), ``graph`` (``cuda_graph = true``) or ``same-step-eager``
    (the graph mode's own step and optimizer form, run without capturing)."""
    record = StepLosses()
    settings = {"epochs": 1, "batch_size": 64, "lr": 0.01, "optimizer": "sgd", "log_every_n_steps": 1, **settings}
    trainer = run_tiny({"losses": record, **(extra or {})}, data=uint8_images(6410, (3, 32, 32), 10), model=seed_cnn(),
                       fit=False, device="cuda", cuda_graph=mode == "graph", **settings)
    if mode == "same-step-eager":
        trainer.graph_step = GraphStep(trainer, capture=False)
    trainer.fit()
    return trainer, record


def assert_same(a: Any, b: Any, losses_a: StepLosses, losses_b: StepLosses) -> None:
    assert len(losses_b.losses) == 101
    assert losses_b.losses == losses_a.losses
    assert losses_b.lrs == losses_a.lrs
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name


def test_100_replayed_sgd_steps_give_the_eager_losses_bit_for_bit() -> None:
    eager, eager_losses = train("eager")
    graph, graph_losses = train("graph")
    assert graph.graph_step is not None and graph.graph_step.replaying and graph.graph_step.captures == 1
    assert_same(eager, graph, eager_losses, graph_losses)


def test_plugins_between_replays_see_and_keep_what_they_would_eagerly() -> None:
    eager_seen, graph_seen = Seen(), Seen()
    train("eager", {"seen": eager_seen})
    graph, _ = train("graph", {"seen": graph_seen})
    assert graph.graph_step is not None and graph.graph_step.replaying
    for (a, b), (c, d) in zip(eager_seen.starts, graph_seen.starts, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)
    for eager_end, graph_end in zip(eager_seen.ends, graph_seen.ends, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(eager_end, graph_end))  # kept copies, not the graph's buffers
    assert graph_seen.stepped == [True] * 101


def test_adam_follows_steplr_through_its_device_learning_rate() -> None:
    same, same_losses = train("same-step-eager", {"steplr": StepLR(step_size=10, gamma=0.7, interval="step")},
                              optimizer="adam", lr=1e-3)
    graph, graph_losses = train("graph", {"steplr": StepLR(step_size=10, gamma=0.7, interval="step")},
                                optimizer="adam", lr=1e-3)
    assert graph.graph_step is not None and graph.graph_step.replaying
    assert graph.graph_step.captures == 1  # the rate changed ten times, in its tensor: no new capture
    assert_same(same, graph, same_losses, graph_losses)
    eager, eager_losses = train("eager", {"steplr": StepLR(step_size=10, gamma=0.7, interval="step")},
                                optimizer="adam", lr=1e-3)
    # Default (not capturable) Adam computes its bias corrections on the host: close, not bit for bit.
    assert eager_losses.losses == pytest.approx(graph_losses.losses, rel=1e-3)


def test_sgd_captures_again_when_its_learning_rate_changes() -> None:
    eager, eager_losses = train("eager", {"steplr": StepLR(step_size=25, gamma=0.5, interval="step")})
    graph, graph_losses = train("graph", {"steplr": StepLR(step_size=25, gamma=0.5, interval="step")})
    assert graph.graph_step is not None and graph.graph_step.replaying
    assert graph.graph_step.captures == 4  # at step 4, then after the changes at steps 25, 50 and 75
    assert_same(eager, graph, eager_losses, graph_losses)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("cuda-graph:")]


def test_a_per_step_sgd_schedule_goes_eager_saying_why(caplog: pytest.LogCaptureFixture) -> None:
    eager, eager_losses = train("eager", {"steplr": StepLR(step_size=1, gamma=0.99, interval="step")})
    with caplog.at_level(logging.WARNING, logger="trainer_core"):
        graph, graph_losses = train("graph", {"steplr": StepLR(step_size=1, gamma=0.99, interval="step")})
    assert warnings_of(caplog) == ["cuda-graph: SGD's learning rate changed 1 step(s) after the step was captured; "
                                   "capturing that often costs more than it saves; running eager"]
    assert graph.graph_step is not None and not graph.graph_step.replaying
    assert_same(eager, graph, eager_losses, graph_losses)


class HookedLayer:
    """Registers a forward hook on the seed CNN's first layer: Python a graph would run only once."""

    @hookimpl
    def on_fit_start(self, trainer: Any) -> None:
        trainer.model.conv1.register_forward_hook(lambda *args: None)


def test_a_module_hook_goes_eager_saying_why(caplog: pytest.LogCaptureFixture) -> None:
    eager, eager_losses = train("eager", {"hooks": HookedLayer()})
    with caplog.at_level(logging.WARNING, logger="trainer_core"):
        graph, graph_losses = train("graph", {"hooks": HookedLayer()})
    assert warnings_of(caplog) == [
        "cuda-graph: module 'conv1' has hooks, Python that would run only when the step is captured; running eager"]
    assert graph.graph_step is not None and not graph.graph_step.replaying and graph.graph_step.captures == 0
    assert_same(eager, graph, eager_losses, graph_losses)


def test_checkpoints_hold_the_optimizer_as_eager_mode_builds_it() -> None:
    graph, _ = train("graph", optimizer="adam", lr=1e-3)
    saved = graph.optimizer.state_dict()
    assert all(group["capturable"] is False and isinstance(group["lr"], float) for group in saved["param_groups"])
    assert all(state["step"].device.type == "cpu" for state in saved["state"].values())
    assert all(state["step"].device.type == "cuda" for state in graph.optimizer.state.values())  # the live state
    eager = torch.optim.Adam(seed_cnn().parameters(), lr=1e-3)
    eager.load_state_dict(saved)  # an eager (CPU) run resumes from it
    assert eager.param_groups[0]["capturable"] is False


@pytest.mark.slow
def test_throughput_compares_the_graph_mode_with_one_graph_by_hand() -> None:
    done = subprocess.run([sys.executable, "benchmarks/throughput.py", "--device", "cuda", "--only", "cnn", "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "ran eager" not in done.stdout and "cuda-graph:" not in done.stderr
    assert re.search(r"^seed CNN whole-step CUDA graph through the trainer / the step captured by hand as one graph: "
                     r"[\d.]+ \(target >= 0\.90", done.stdout, re.MULTILINE), done.stdout
