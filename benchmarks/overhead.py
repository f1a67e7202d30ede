"""Framework overhead: the seed's hand-written loop vs. the Trainer, side by side.

    python benchmarks/overhead.py [--repeats 5] [--threads 1] [--steps 256] [--each-plugin]

In one process, on identical in-memory data, model, optimizer, seed and
thread count, interleaved and repeated, it times

  (a) the seed's hand-written loop (train an epoch, then evaluate, like the seed),
  (b) ``Trainer`` with no plugins,
  (c) ``Trainer`` with every built-in plugin on (tensorboard, steplr, checkpoint
      every epoch, class-accuracy, progress),

for the seed CNN (3x32x32) and the seed MLP (1x28x28) at batch sizes 4 and 128.
Before timing it checks that (a) and (b) end with bit-identical weights.
Each run trains two epochs.  It prints the median time per training step with
the min-max range, and the overhead of (b) and (c) over (a) in microseconds
and percent: once for the steady state (the second epoch's training steps:
what a long run pays per step), once for whole runs (adding each run's fixed
costs: setup, evaluations, the TensorBoard graph and images, checkpoint files),
amortised over the run's steps.  ``--each-plugin`` also times each built-in alone.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from plugins.models.convnet import build as build_convnet
from plugins.models.mlp import build as build_mlp
from trainer_core import hookimpl
from trainer_core.config import RunConfig
from trainer_core.data import DataBundle, TensorSplit, epoch_order
from trainer_core.runner import load_plugins
from trainer_core.pluginmanager import make_plugin_manager
from trainer_core.rundir import RunDir
from trainer_core.trainer import Trainer

ALL_PLUGINS = {
    "tensorboard": {},
    "steplr": {"step_size": 1, "gamma": 0.9},
    "checkpoint": {},
    "class-accuracy": {},
    "progress": {"bar": "off"},
}
SEED, LR, EPOCHS = 0, 0.001, 2

CASES = {
    "seed CNN 3x32x32": ((3, 32, 32), build_convnet),
    "seed MLP 1x28x28": ((1, 28, 28), build_mlp),
}


def make_data(shape: tuple[int, ...], train: int, val: int) -> DataBundle:
    generator = torch.Generator().manual_seed(1)
    def split(n: int) -> TensorSplit:
        return TensorSplit(torch.randn(n, *shape, generator=generator), torch.randint(0, 10, (n,), generator=generator))
    return DataBundle(split(train), split(val), [str(i) for i in range(10)], shape)


def new_model(build: Callable[..., nn.Module], shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(SEED)
    return build(shape, 10)


class Timing:
    """Per-step seconds of the last epoch's training phase (the steady state:
    one-off work such as tracing the graph happens in the first), and of the
    whole run (setup, every epoch, evaluations, files)."""

    def __init__(self, steady: float, total: float) -> None:
        self.steady, self.total = steady, total


def hand_written(model: nn.Module, data: DataBundle, batch_size: int) -> Timing:
    """The seed's loop, batching in-memory tensors in the trainer's epoch order."""
    started = time.perf_counter()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = data.train.inputs, data.train.targets
    steps = 0
    for epoch in range(1, EPOCHS + 1):
        model.train()
        epoch_started, epoch_steps = time.perf_counter(), 0
        order = epoch_order(len(y), SEED, epoch)
        for first in range(0, len(y), batch_size):
            index = order[first : first + batch_size]
            images, labels = x[index], y[index]
            outputs = model(images)
            loss = criterion(outputs, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            epoch_steps += 1
        steady = (time.perf_counter() - epoch_started) / epoch_steps
        steps += epoch_steps
        model.eval()
        with torch.no_grad():  # the seed's evaluation
            correct = 0
            for first in range(0, len(data.val.targets), batch_size):
                outputs = model(data.val.inputs[first : first + batch_size])
                correct += (outputs.argmax(1) == data.val.targets[first : first + batch_size]).sum().item()
    return Timing(steady, (time.perf_counter() - started) / steps)


class EpochClock:
    """Times each epoch's training phase; its hooks run at epoch boundaries only."""

    def __init__(self) -> None:
        self.started, self.seconds = 0.0, 0.0

    @hookimpl(tryfirst=True)
    def on_epoch_start(self) -> None:
        self.started = time.perf_counter()

    @hookimpl(tryfirst=True)
    def on_eval_start(self) -> None:
        self.seconds = time.perf_counter() - self.started


def with_trainer(model: nn.Module, data: DataBundle, batch_size: int, plugins: dict, folder: Path | None) -> Timing:
    started = time.perf_counter()
    config = RunConfig(epochs=EPOCHS, batch_size=batch_size, lr=LR, optimizer="sgd", momentum=0.0, seed=SEED,
                       device="cpu", plugins=plugins)
    clock = EpochClock()
    with contextlib.redirect_stdout(io.StringIO()):  # console output is not what we time
        pm = make_plugin_manager()
        load_plugins(pm, plugins)
        pm.register(clock, name="benchmark-clock")
        run_dir = RunDir.create(folder, overwrite=True) if folder is not None else None
        trainer = Trainer(model, data, config, pm=pm, run_dir=run_dir)
        trainer.fit()
    steps = trainer.state.step
    return Timing(clock.seconds / (steps // EPOCHS), (time.perf_counter() - started) / steps)


def check_same_weights(build: Callable[..., nn.Module], shape: tuple[int, ...], data: DataBundle, batch_size: int) -> None:
    a, b = new_model(build, shape), new_model(build, shape)
    hand_written(a, data, batch_size)
    with_trainer(b, data, batch_size, {}, None)
    if not all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())):
        sys.exit("FAILED: the hand-written loop and the Trainer ended with different weights")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=256, help="training steps per epoch")
    parser.add_argument("--batch-sizes", default="4,128")
    parser.add_argument("--each-plugin", action="store_true", help="also time each built-in plugin alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU; {args.repeats} interleaved repeats; "
          f"{EPOCHS} epochs of {args.steps} steps + evaluation per run")
    with tempfile.TemporaryDirectory() as tmp:
        for case, (shape, build) in CASES.items():
            for batch_size in (int(b) for b in args.batch_sizes.split(",")):
                data = make_data(shape, args.steps * batch_size, 512)
                check_same_weights(build, shape, data, batch_size)
                def trainer_with(plugins: dict) -> Callable[[], Timing]:
                    return lambda: with_trainer(new_model(build, shape), data, batch_size, plugins, Path(tmp) / "run")
                variants = {
                    "a hand-written": lambda: hand_written(new_model(build, shape), data, batch_size),
                    "b trainer, no plugins": trainer_with({}),
                    "c trainer, all built-ins": trainer_with(ALL_PLUGINS),
                }
                if args.each_plugin:
                    variants.update({f"  {name} alone": trainer_with({name: options}) for name, options in ALL_PLUGINS.items()})
                for fn in variants.values():  # warm-up: allocator, lazy imports
                    fn()
                runs: dict[str, list[Timing]] = {name: [] for name in variants}
                for _ in range(args.repeats):
                    for name, fn in variants.items():
                        runs[name].append(fn())
                print(f"\n{case}, batch {batch_size}: weights of (a) and (b) identical")
                report("training steps, steady state (last epoch)", {n: [t.steady for t in r] for n, r in runs.items()})
                report("whole runs (setup, evaluations, files, one-off logging)", {n: [t.total for t in r] for n, r in runs.items()})


def report(title: str, per_step: dict[str, list[float]]) -> None:
    base = statistics.median(per_step["a hand-written"])
    print(f"  {title}: median us/step [min-max]")
    for name, values in per_step.items():
        median = statistics.median(values)
        extra = "" if name.startswith("a") else (
            f"  overhead {1e6 * (median - base):+8.1f} us ({100 * (median / base - 1):+6.1f} %)")
        print(f"    {name:28s} {1e6 * median:9.1f}  [{1e6 * min(values):.1f}-{1e6 * max(values):.1f}]{extra}")


if __name__ == "__main__":
    main()
