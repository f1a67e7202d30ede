"""Framework overhead: the seed's hand-written loop vs. the Trainer, side by side.

    python benchmarks/overhead.py [--repeats 5] [--threads 1] [--with-lightning]

In one process, on identical in-memory data, model, optimizer, seed and
thread count, interleaved and repeated, it times

  (a) the seed's hand-written loop (train an epoch, then evaluate, like the seed),
  (b) ``Trainer`` with no plugins,
  (c) ``Trainer`` with every built-in plugin on (tensorboard, steplr, checkpoint
      every epoch, class-accuracy, progress),

for the seed CNN (3x32x32) and the seed MLP (1x28x28) at batch sizes 4 and 128.
Before timing it checks that (a) and (b) end with bit-identical weights.
It prints the median time per training step with the min-max range, and the
overhead of (b) and (c) over (a) in microseconds and percent: once for the
training steps alone (the per-step cost), once for whole runs (adding each
run's fixed costs: setup, evaluation, TensorBoard graph and images,
checkpoint files), amortised over the run's steps.
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
SEED, LR, EPOCHS = 0, 0.001, 1

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
    """Seconds spent in training phases and in the whole run, and steps taken."""

    def __init__(self, train: float, total: float, steps: int) -> None:
        self.train, self.total, self.steps = train, total, steps


def hand_written(model: nn.Module, data: DataBundle, batch_size: int) -> Timing:
    """The seed's loop, batching in-memory tensors in the trainer's epoch order."""
    started = time.perf_counter()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = data.train.inputs, data.train.targets
    steps, train = 0, 0.0
    for epoch in range(1, EPOCHS + 1):
        model.train()
        epoch_started = time.perf_counter()
        order = epoch_order(len(y), SEED, epoch)
        for first in range(0, len(y), batch_size):
            index = order[first : first + batch_size]
            images, labels = x[index], y[index]
            outputs = model(images)
            loss = criterion(outputs, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
        train += time.perf_counter() - epoch_started
        model.eval()
        with torch.no_grad():  # the seed's evaluation
            correct = 0
            for first in range(0, len(data.val.targets), batch_size):
                outputs = model(data.val.inputs[first : first + batch_size])
                correct += (outputs.argmax(1) == data.val.targets[first : first + batch_size]).sum().item()
    return Timing(train, time.perf_counter() - started, steps)


def with_trainer(model: nn.Module, data: DataBundle, batch_size: int, plugins: dict, folder: Path | None) -> Timing:
    started = time.perf_counter()
    config = RunConfig(epochs=EPOCHS, batch_size=batch_size, lr=LR, optimizer="sgd", momentum=0.0, seed=SEED,
                       device="cpu", plugins=plugins)
    with contextlib.redirect_stdout(io.StringIO()):  # console output is not what we time
        pm = make_plugin_manager()
        load_plugins(pm, plugins)
        run_dir = RunDir.create(folder, overwrite=True) if folder is not None else None
        trainer = Trainer(model, data, config, pm=pm, run_dir=run_dir)
        trainer.fit()
    return Timing(trainer.state.train_seconds, time.perf_counter() - started, trainer.state.step)


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
    parser.add_argument("--train-samples", type=int, default=2048)
    parser.add_argument("--batch-sizes", default="4,128")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU; {args.repeats} interleaved repeats; "
          f"{args.train_samples} training samples, 1 epoch + evaluation per run")
    with tempfile.TemporaryDirectory() as tmp:
        for case, (shape, build) in CASES.items():
            for batch_size in (int(b) for b in args.batch_sizes.split(",")):
                data = make_data(shape, args.train_samples, 512)
                check_same_weights(build, shape, data, batch_size)
                variants = {
                    "a hand-written": lambda: hand_written(new_model(build, shape), data, batch_size),
                    "b trainer, no plugins": lambda: with_trainer(new_model(build, shape), data, batch_size, {}, None),
                    "c trainer, all built-ins": lambda: with_trainer(new_model(build, shape), data, batch_size,
                                                                     ALL_PLUGINS, Path(tmp) / "run"),
                }
                for fn in variants.values():  # warm-up: allocator, lazy imports
                    fn()
                runs: dict[str, list[Timing]] = {name: [] for name in variants}
                for _ in range(args.repeats):
                    for name, fn in variants.items():
                        runs[name].append(fn())
                print(f"\n{case}, batch {batch_size}: weights of (a) and (b) identical")
                report("training steps only", {n: [t.train / t.steps for t in r] for n, r in runs.items()})
                report("whole runs (setup, evaluation, files)", {n: [t.total / t.steps for t in r] for n, r in runs.items()})


def report(title: str, per_step: dict[str, list[float]]) -> None:
    base = statistics.median(per_step["a hand-written"])
    print(f"  {title}: median us/step [min-max]")
    for name, values in per_step.items():
        median = statistics.median(values)
        extra = "" if name.startswith("a") else (
            f"  overhead {1e6 * (median - base):+7.1f} us ({100 * (median / base - 1):+5.1f} %)")
        print(f"    {name:26s} {1e6 * median:9.1f}  [{1e6 * min(values):.1f}-{1e6 * max(values):.1f}]{extra}")

if __name__ == "__main__":
    main()
