"""Framework overhead: the seed's hand-written loop vs. the Trainer, side by side.

    python benchmarks/overhead.py [--repeats 9] [--threads 1] [--steps N] [--cases cnn,mlp]
                                  [--batch-sizes 4,128] [--device cpu] [--each-plugin] [--with-lightning] [--with-mlflow]

In one process, on identical in-memory data, model, optimizer, seed and
thread count, interleaved and repeated, it times

  (a)  the seed's hand-written loop (train an epoch, then evaluate, like the seed),
  (a+) the same, keeping the training loss as the seed's MNIST loop does
       (``running_loss += loss.item()`` every step, its mean taken every 50
       steps): what a hand-written loop pays to report its loss, as the
       trainer does (without a host sync per step),
  (b)  ``Trainer`` with no plugins,
  (b') the same again, as a gauge of the noise: what it differs from (b) is
       the host, not the code,
  (c)  ``Trainer`` with every built-in plugin on (tensorboard, steplr,
       checkpoint every epoch, class-accuracy, progress), at their defaults,
  (c+) the same with tensorboard's opt-in training accuracy,
  (d)  ``Trainer`` with ``trainer run``'s default plugins (progress, checkpoint
       every epoch), at their defaults,
  (m)  ``--with-mlflow``: (c) and the mlflow plugin, its store the default
       SQLite file beside the run folder (needs ``pip install -e '.[mlflow]'``),

for the seed CNN (3x32x32) and the seed MLP (1x28x28) at batch sizes 4 and 128
(``--cases null``: a single Linear layer, whose step is mostly the loop around
it, to see the framework's own cost in microseconds).
Before timing it checks that (a) and (b) end with bit-identical weights.
Each run trains two epochs.  It prints the median time per training step with
the min-max range, and the overhead of each variant over (a): per repeat, the
ratio to the (a) run of the same repeat (runs next to each other in time, so
the host's slow drifts cancel), then the median and interquartile range of
those ratios; and the ratio of the fastest runs (min/min), the runs least
disturbed by neighbours on a shared machine.  Once for the steady state (the
second epoch's training steps: what a long run pays per step), once for whole
runs (adding each run's fixed costs: setup, evaluations, the TensorBoard graph
and images, checkpoint files), amortised over the run's steps.  Every variant
trains the same model object, reset to the same initial weights, so no
variant gets luckier memory placement.  ``--each-plugin`` also times each
built-in alone; ``--with-lightning`` (only if Lightning is installed) adds the
same model through Lightning's Trainer, everything off and with per-step
logging to TensorBoard.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from trainer_core_plugins.models.convnet import build as build_convnet
from trainer_core_plugins.models.mlp import build as build_mlp
from trainer_core import hookimpl
from trainer_core.config import DEFAULT_PLUGINS, RunConfig
from trainer_core.data import DataBundle, TensorSplit, epoch_order
from trainer_core.pluginmanager import make_plugin_manager
from trainer_core.rundir import RunDir
from trainer_core.runner import load_plugins
from trainer_core.trainer import Trainer

ALL_PLUGINS = {
    "tensorboard": {},
    "steplr": {"step_size": 1, "gamma": 0.9},
    "checkpoint": {},
    "class-accuracy": {},
    "progress": {"bar": "off"},
}
SEED, LR, EPOCHS = 0, 0.001, 2

def build_null(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Next to no compute (16 inputs, 10 outputs): its step is mostly the loop
    around it, so the framework's cost per step shows in microseconds."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


CASES = {
    "cnn": ("seed CNN 3x32x32", (3, 32, 32), build_convnet),
    "mlp": ("seed MLP 1x28x28", (1, 28, 28), build_mlp),
    "null": ("null model 1x4x4 (one Linear)", (1, 4, 4), build_null),
}


def make_data(shape: tuple[int, ...], train: int, val: int) -> DataBundle:
    generator = torch.Generator().manual_seed(1)
    def split(n: int) -> TensorSplit:
        return TensorSplit(torch.randn(n, *shape, generator=generator), torch.randint(0, 10, (n,), generator=generator))
    return DataBundle(split(train), split(val), [str(i) for i in range(10)], shape)


def new_model(build: Callable[..., nn.Module], shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(SEED)
    return build(shape, 10)


class Subject:
    """One model object that every variant trains, reset to the same initial
    weights before each run: the same tensors at the same addresses each time."""

    def __init__(self, build: Callable[..., nn.Module], shape: tuple[int, ...], device: torch.device) -> None:
        self.model = new_model(build, shape).to(device)
        self.initial = copy.deepcopy(self.model.state_dict())

    def fresh(self) -> nn.Module:
        self.model.load_state_dict(self.initial)
        self.model.zero_grad(set_to_none=True)
        return self.model


class Timing:
    """Per-step seconds of the last epoch's training phase (the steady state:
    one-off work such as tracing the graph happens in the first), and of the
    whole run (setup, every epoch, evaluations, files)."""

    def __init__(self, steady: float, total: float) -> None:
        self.steady, self.total = steady, total


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work before a clock is read (nothing to wait for on the CPU)."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def hand_written(model: nn.Module, data: DataBundle, batch_size: int, track_loss: bool = False) -> Timing:
    """The seed's loop, batching in-memory tensors in the trainer's epoch order;
    with ``track_loss``, adding up the loss like the seed's MNIST loop."""
    device = next(model.parameters()).device
    sync = synchronizer(device)
    sync()
    started = time.perf_counter()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = data.train.inputs.to(device), data.train.targets.to(device)
    val_x, val_y = data.val.inputs.to(device), data.val.targets.to(device)
    steps, running_loss, interval_means = 0, 0.0, []
    for epoch in range(1, EPOCHS + 1):
        model.train()
        sync()
        epoch_started, epoch_steps = time.perf_counter(), 0
        order = epoch_order(len(y), SEED, epoch).to(device)
        for first in range(0, len(y), batch_size):
            index = order[first : first + batch_size]
            images, labels = x[index], y[index]
            outputs = model(images)
            loss = criterion(outputs, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            epoch_steps += 1
            if track_loss:
                running_loss += loss.item()
                if epoch_steps % 50 == 0:  # what the seed writes to TensorBoard; kept, as it would be
                    interval_means.append(running_loss / 50)
                    running_loss = 0.0
        sync()
        steady = (time.perf_counter() - epoch_started) / epoch_steps
        steps += epoch_steps
        model.eval()
        with torch.no_grad():  # the seed's evaluation
            correct = 0
            for first in range(0, len(val_y), batch_size):
                outputs = model(val_x[first : first + batch_size])
                correct += (outputs.argmax(1) == val_y[first : first + batch_size]).sum().item()
    return Timing(steady, (time.perf_counter() - started) / steps)


class EpochClock:
    """Times each epoch's training phase; its hooks run at epoch boundaries only."""

    def __init__(self, device: torch.device) -> None:
        self.sync = synchronizer(device)
        self.started, self.seconds = 0.0, 0.0

    @hookimpl(tryfirst=True)
    def on_epoch_start(self) -> None:
        self.sync()
        self.started = time.perf_counter()

    @hookimpl(tryfirst=True)
    def on_eval_start(self) -> None:
        self.sync()
        self.seconds = time.perf_counter() - self.started


def with_trainer(model: nn.Module, data: DataBundle, batch_size: int, plugins: dict, folder: Path | None) -> Timing:
    device = next(model.parameters()).device
    sync = synchronizer(device)
    sync()
    started = time.perf_counter()
    config = RunConfig(epochs=EPOCHS, batch_size=batch_size, lr=LR, optimizer="sgd", momentum=0.0, seed=SEED,
                       device=str(device), plugins=plugins)
    clock = EpochClock(device)
    with contextlib.redirect_stdout(io.StringIO()):  # console output is not what we time
        pm = make_plugin_manager()
        load_plugins(pm, plugins)
        pm.register(clock, name="benchmark-clock")
        run_dir = RunDir.create(folder, overwrite=True) if folder is not None else None
        trainer = Trainer(model, data, config, pm=pm, run_dir=run_dir)
        trainer.fit()
    sync()
    steps = trainer.state.step
    return Timing(clock.seconds / (steps // EPOCHS), (time.perf_counter() - started) / steps)


def check_same_weights(build: Callable[..., nn.Module], shape: tuple[int, ...], data: DataBundle, batch_size: int,
                       device: torch.device) -> str:
    """How equal (a) and (b)'s final weights are; exits when they differ."""
    a, b = new_model(build, shape).to(device), new_model(build, shape).to(device)
    hand_written(a, data, batch_size)
    with_trainer(b, data, batch_size, {}, None)
    pairs = list(zip(a.parameters(), b.parameters()))
    if all(torch.equal(p, q) for p, q in pairs):
        return "identical"
    # cuDNN's convolution gradients are not bit-reproducible from run to run: on a GPU, rounding apart.
    if device.type == "cuda" and all(torch.allclose(p, q, rtol=1e-4, atol=1e-6) for p, q in pairs):
        return "equal within float rounding (CUDA kernels are not bit-reproducible)"
    sys.exit("FAILED: the hand-written loop and the Trainer ended with different weights")


def variants_for(subject: Subject, data: DataBundle, batch_size: int, folder: Path,
                 each_plugin: bool, lightning: bool, mlflow: bool = False) -> dict[str, Callable[[], Timing]]:
    def trainer_with(plugins: dict) -> Callable[[], Timing]:
        return lambda: with_trainer(subject.fresh(), data, batch_size, plugins, folder)
    variants = {
        "a hand-written": lambda: hand_written(subject.fresh(), data, batch_size),
        "a+ and its running loss": lambda: hand_written(subject.fresh(), data, batch_size, track_loss=True),
        "b trainer, no plugins": trainer_with({}),
        "b' the same again (noise gauge)": trainer_with({}),
        "c trainer, all built-ins": trainer_with(ALL_PLUGINS),
        "c+ and train accuracy": trainer_with({**ALL_PLUGINS, "tensorboard": {"train_accuracy": True}}),
        "d trainer run's default plugins": trainer_with({name: ALL_PLUGINS[name] for name in DEFAULT_PLUGINS}),
    }
    if mlflow:
        variants["m all built-ins and mlflow"] = trainer_with({**ALL_PLUGINS, "mlflow": {}})
    if each_plugin:
        variants.update({f"  {name} alone": trainer_with({name: options}) for name, options in ALL_PLUGINS.items()})
    if lightning:
        from lightning_loop import with_lightning

        def lightning_with(logging: bool) -> Callable[[], Timing]:
            return lambda: Timing(*with_lightning(subject.fresh(), data, batch_size, epochs=EPOCHS, lr=LR, seed=SEED,
                                                  per_step_logging=logging, folder=folder.with_name("lightning")))
        variants["L lightning, everything off"] = lightning_with(False)
        variants["L lightning, per-step logging"] = lightning_with(True)
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per epoch (default: 250 at batch sizes under 128, else 100: "
                             "whole logging intervals of 50)")
    parser.add_argument("--cases", default="cnn,mlp", help="cnn, mlp (the seed models) and null (a model with next to no "
                                                         "compute, to see the framework's own cost per step)")
    parser.add_argument("--batch-sizes", default="4,128")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for one GPU (data resident on it)")
    parser.add_argument("--each-plugin", action="store_true", help="also time each built-in plugin alone")
    parser.add_argument("--with-lightning", action="store_true", help="also time Lightning's Trainer (if installed)")
    parser.add_argument("--with-mlflow", action="store_true", help="also time (c) with the mlflow plugin (if installed)")
    args = parser.parse_args()
    if args.with_lightning:
        from lightning_loop import lightning_available

        if not lightning_available():
            sys.exit("--with-lightning needs Lightning: pip install lightning")
    if args.with_mlflow:
        import importlib.util

        if importlib.util.find_spec("mlflow") is None:
            sys.exit("--with-mlflow needs the mlflow extra: pip install -e '.[mlflow]'")
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        sys.exit(f"unknown case {', '.join(sorted(unknown))}: choose from {', '.join(CASES)}")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {args.threads} thread(s), {where}; {args.repeats} interleaved repeats; "
          f"{EPOCHS} epochs + evaluation per run")
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.cases.split(","):
            case, shape, build = CASES[key]
            for batch_size in (int(b) for b in args.batch_sizes.split(",")):
                steps = args.steps or (250 if batch_size < 128 else 100)
                data = make_data(shape, steps * batch_size, 512)
                equal = check_same_weights(build, shape, data, batch_size, device)
                subject = Subject(build, shape, device)
                variants = variants_for(subject, data, batch_size, Path(tmp) / "run", args.each_plugin, args.with_lightning,
                                        args.with_mlflow)
                for fn in variants.values():  # warm-up: allocator, lazy imports
                    fn()
                runs: dict[str, list[Timing]] = {name: [] for name in variants}
                names = list(variants)
                for repeat in range(args.repeats):
                    turn = repeat % len(names)  # each variant takes every position in the order in turn
                    for name in names[turn:] + names[:turn]:
                        runs[name].append(variants[name]())
                print(f"\n{case}, batch {batch_size}, {steps} steps an epoch: weights of (a) and (b) {equal}")
                report("training steps, steady state (last epoch)", {n: [t.steady for t in r] for n, r in runs.items()})
                report("whole runs (setup, evaluations, files, one-off logging)", {n: [t.total for t in r] for n, r in runs.items()})


def report(title: str, per_step: dict[str, list[float]]) -> None:
    """Medians with ranges, and each variant's overhead over (a) paired by repeat."""
    base = per_step["a hand-written"]
    print(f"  {title}: median us/step [min-max]; overhead over (a), median of the repeats [interquartile range]")
    for name, values in per_step.items():
        line = f"    {name:32s} {1e6 * statistics.median(values):9.1f}  [{1e6 * min(values):.1f}-{1e6 * max(values):.1f}]"
        if name != "a hand-written":
            ratios = [100 * (v / b - 1) for v, b in zip(values, base)]
            q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            micros = statistics.median(1e6 * (v - b) for v, b in zip(values, base))
            line += (f"  {micros:+8.1f} us  {statistics.median(ratios):+6.1f} %  [{q1:+.1f}, {q3:+.1f}]"
                     f"  min/min {100 * (min(values) / min(base) - 1):+6.1f} %")
        print(line)


if __name__ == "__main__":
    main()
