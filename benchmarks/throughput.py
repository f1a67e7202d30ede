"""Training throughput through ``Trainer`` with the data resident on the device.

    python benchmarks/throughput.py [--device cuda] [--only cnn,resnet] [--cudnn-benchmark-too] [--quick [--compile-too]]

Issue 5's GPU measurements, in samples per second of training:

  cnn     the seed CNN (``convnet``, 3x32x32, 10 classes) at batch 512: the
          same training written by hand (the baseline: what the host allows),
          then through the trainer eager, compiled (``compile=True``;
          compilation time reported apart) and compiled with
          ``compile_mode="reduce-overhead"`` (CUDA graphs), and with
          ``cuda_graph=True`` (the whole step replayed from CUDA graphs,
          compared with the same step captured by hand as one graph);
  cnn-more  the seed CNN with cudnn.benchmark, with bf16 + channels-last, compiled
          with CUDA graphs and cudnn.benchmark, and eager at batch 2048 (what
          else moves its rate);
  resnet  ResNet-18 (torchvision's, random weights, 3x224x224, 1000 classes) at
          batch 256: fp32, then bf16 autocast with channels-last; with
          ``--cudnn-benchmark-too`` both again with ``torch.backends.cudnn.benchmark``
          on (the trainer leaves it off, PyTorch's default).

The data are synthetic: random uint8 images and labels generated on the device
and kept there, batched by indexing and normalised per batch by the trainer,
the path a real in-memory image dataset takes.  This measures speed, not accuracy.

Each case trains one warm-up epoch (not timed: compilation, cuDNN's first
calls, the allocator's growth), then the timed epochs.  A plugin clock
synchronises the device at the start and the end of each timed epoch's
training phase (``on_epoch_start``, ``on_eval_start``), so evaluations are not
timed.  On a GPU the eager CNN case then trains one more, untimed epoch with
PyTorch's sync debug mode on and counts the host synchronisations in it: the
trainer's own are a few per logging interval; as many as the steps means a
synchronisation in every step.  On a GPU it first measures how long the host
takes to launch one small kernel, and counts the kernels of one hand-written
CNN step: a small model's GPU step is often no faster than its launches.

``--quick`` shrinks every size so the whole script runs on a CPU in seconds (to
check that it works; its numbers mean nothing) and skips compilation unless
``--compile-too`` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from trainer_core_plugins.models.convnet import build as build_convnet
from trainer_core_plugins.models.torchvision_models import build_resnet18
from trainer_core import hookimpl
from trainer_core.config import RunConfig
from trainer_core.data import DataBundle, TensorSplit
from trainer_core.errors import TrainerError
from trainer_core.runtime import select_device
from trainer_core.trainer import Trainer

CNN_TARGET = 1_000_000  # samples/s, eager, H100-class card (issue 5)
RESNET_TARGET = 2.0  # bf16 + channels-last over fp32 (issue 5)
GRAPH_TARGET = 0.90  # the trainer's whole-step graph mode over the one-graph step by hand (issue 17)
SYNC_WARNING = "synchronizing CUDA operation"  # what PyTorch's sync debug mode warns


@dataclass
class Case:
    """One configuration to time."""

    name: str
    build: Callable[[tuple[int, ...], int], nn.Module]
    shape: tuple[int, int, int]
    classes: int
    batch: int
    steps: int  # training steps per epoch: the split holds exactly steps * batch samples
    precision: str = "32"
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"
    cudnn_benchmark: bool = False
    cuda_graph: bool = False
    hand_written: bool = False  # the seed's loop instead of the trainer


@dataclass
class Result:
    """Samples/s of each timed epoch, and what the run cost besides."""

    rates: list[float]
    data_mib: float  # the training split, resident on the device
    warmup_seconds: float
    compile_seconds: float | None
    peak_gib: float | None
    syncs: int | None  # host syncs in the audited epoch, when audited

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU needs no wait)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EpochClock:
    """Times each epoch's training phase with the device synchronised at both
    ends; in ``audit_epoch`` it turns PyTorch's sync debug mode on instead.
    Its hooks run at epoch boundaries only: nothing per step."""

    def __init__(self, device: torch.device, audit_epoch: int | None) -> None:
        self.device = device
        self.audit_epoch = audit_epoch
        self.seconds: dict[int, float] = {}
        self.epoch, self.started = 0, 0.0
        self.audit_error: str | None = None

    @hookimpl(tryfirst=True)
    def on_epoch_start(self, epoch: int) -> None:
        synchronize(self.device)
        self.epoch, self.started = epoch, time.perf_counter()
        if epoch == self.audit_epoch:
            self.sync_debug("warn")

    @hookimpl(tryfirst=True)
    def on_eval_start(self) -> None:
        if self.epoch == self.audit_epoch:
            self.sync_debug("default")
        synchronize(self.device)
        self.seconds[self.epoch] = time.perf_counter() - self.started

    def sync_debug(self, mode: str) -> None:
        try:  # a diagnostic: its failure must not end the timed run
            torch.cuda.set_sync_debug_mode(mode)
        except Exception as exc:
            self.audit_error = f"{type(exc).__name__}: {exc}"


def synthetic_data(case: Case, device: torch.device) -> DataBundle:
    """Random uint8 images and labels made on ``device``: one split of
    ``steps`` full batches for training, one batch for the (untimed) evaluation."""
    def split(n: int) -> TensorSplit:
        images = torch.randint(0, 256, (n, *case.shape), dtype=torch.uint8, device=device)
        return TensorSplit(images, torch.randint(0, case.classes, (n,), device=device))
    return DataBundle(split(case.steps * case.batch), split(case.batch), [str(i) for i in range(case.classes)],
                      case.shape, mean=(0.5,) * case.shape[0], std=(0.25,) * case.shape[0])


def hand_written_step(model: nn.Module, data: DataBundle) -> Callable[[torch.Tensor], None]:
    """One training step of the seed's loop on a batch of indices, with the
    trainer's normalisation and optimizer, so that it does the same work."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    x, y = data.train.inputs, data.train.targets  # type: ignore[union-attr]
    mean = torch.tensor(data.mean, device=x.device).view(-1, 1, 1)
    std = torch.tensor(data.std, device=x.device).view(-1, 1, 1)

    def step(index: torch.Tensor) -> None:
        images = (x[index].float().div_(255) - mean) / std
        loss = criterion(model(images), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def run_hand_written(case: Case, device: torch.device, timed_epochs: int) -> Result:
    """The baseline: ``case`` trained by the seed's loop, timed like :func:`run_case`."""
    torch.manual_seed(0)
    model = case.build(case.shape, case.classes).to(device)
    data = synthetic_data(case, device)
    step = hand_written_step(model, data)
    seconds = []
    for epoch in range(1 + timed_epochs):
        order = torch.randperm(case.steps * case.batch, device=device)
        synchronize(device)
        started = time.perf_counter()
        for first in range(0, len(order), case.batch):
            step(order[first : first + case.batch])
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    samples = case.steps * case.batch
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return Result([samples / s for s in seconds[1:]], data.train.inputs.nbytes / 2**20,  # type: ignore[union-attr]
                  seconds[0], None, peak, None)


def launch_report(device: torch.device) -> float | None:
    """How fast this host launches kernels, and how many one seed-CNN step launches:
    their product is the least time such a step can take however fast the GPU.
    Returns the samples/s of that step replayed from one CUDA graph (``None`` if it failed)."""
    x = torch.zeros(1, device=device)
    for _ in range(100):
        x.add_(1)
    synchronize(device)
    count = 5000
    started = time.perf_counter()
    for _ in range(count):
        x.add_(1)
    synchronize(device)
    launch_us = (time.perf_counter() - started) / count * 1e6
    case = Case("", build_convnet, (3, 32, 32), 10, 512, 4)
    model = build_convnet(case.shape, case.classes).to(device)
    step = hand_written_step(model, synthetic_data(case, device))
    index = torch.arange(case.batch, device=device)
    step(index)  # the optimizer's state and cuDNN's choices are made in the first step
    synchronize(device)
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step(index)
            synchronize(device)
        on_gpu = [event for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]
        kernels, gpu_us = len(on_gpu), sum(event.time_range.elapsed_us() for event in on_gpu)
    except Exception as exc:  # a diagnostic: the profiler may be unavailable in a sandbox
        print(f"kernel launch: {launch_us:.1f} us per small kernel (counting a step's kernels failed: {exc})")
        return None
    if not kernels or not gpu_us:
        print(f"kernel launch: {launch_us:.1f} us per small kernel (the profiler saw no kernels)")
        return None
    print(f"kernel launch: {launch_us:.1f} us per small kernel; one seed CNN step (batch 512, written by hand) runs "
          f"{kernels} kernels and copies: at least {kernels * launch_us / 1000:.2f} ms a step, at most "
          f"{case.batch / (kernels * launch_us) * 1e6:,.0f} samples/s on this host, however fast the GPU; they run "
          f"for {gpu_us:,.0f} us on the GPU (at most {case.batch / gpu_us * 1e6:,.0f} samples/s however fast the host)",
          flush=True)
    try:
        rate = whole_step_graph_rate(step, case, device)
    except Exception as exc:  # a diagnostic, like the count above
        print(f"whole-step CUDA graph: failed ({type(exc).__name__}: {exc})")
        return None
    print(f"the same step captured whole in one CUDA graph and replayed (by hand, no trainer): {rate:,.0f} samples/s: "
          "what this GPU does when the host launches next to nothing", flush=True)
    return rate


def whole_step_graph_rate(step: Callable[[torch.Tensor], None], case: Case, device: torch.device) -> float:
    """Samples/s of ``step`` (already run once) replayed from one CUDA graph: the GPU's own speed."""
    index = torch.arange(case.batch, device=device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        for _ in range(3):
            step(index)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(index)
    orders = torch.randint(0, case.steps * case.batch, (200, case.batch), device=device)
    for order in orders[:10]:
        index.copy_(order)
        graph.replay()
    synchronize(device)
    started = time.perf_counter()
    for order in orders:
        index.copy_(order)
        graph.replay()
    synchronize(device)
    return len(orders) * case.batch / (time.perf_counter() - started)


def run_case(case: Case, device: torch.device, timed_epochs: int, audit: bool) -> Result:
    """Train ``case`` for one warm-up epoch, ``timed_epochs`` timed ones and,
    with ``audit``, one more with the sync debug mode on; return its timings."""
    torch.manual_seed(0)
    model = case.build(case.shape, case.classes)
    data = synthetic_data(case, device)
    audit_epoch = 2 + timed_epochs if audit else None
    config = RunConfig(epochs=1 + timed_epochs + audit, batch_size=case.batch, lr=1e-3, optimizer="sgd",
                       momentum=0.9, seed=0, device=str(device), precision=case.precision,  # type: ignore[arg-type]
                       channels_last=case.channels_last, compile=case.compile, compile_mode=case.compile_mode,  # type: ignore[arg-type]
                       cuda_graph=case.cuda_graph, plugins={})
    clock = EpochClock(device, audit_epoch)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(model, data, config, plugins={"benchmark-clock": clock})
    default_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = case.cudnn_benchmark
    with warnings.catch_warnings(record=True) as caught:
        if audit:
            warnings.simplefilter("always")  # every sync warns, not only a line's first
        try:
            trainer.fit()
        finally:
            torch.backends.cudnn.benchmark = default_benchmark
            if audit:  # also when the run failed mid-audit: later cases must not warn at every sync
                clock.sync_debug("default")
    for warning in caught:  # the others are not ours to swallow
        if SYNC_WARNING not in str(warning.message):
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    if case.cuda_graph and not (trainer.graph_step is not None and trainer.graph_step.replaying):
        print(f"  ({case.name}: ran eager, as the cuda-graph warning says)", flush=True)
    syncs = None
    if audit and clock.audit_error is not None:
        print(f"  (sync audit failed: {clock.audit_error})", flush=True)
    elif audit:
        syncs = sum(SYNC_WARNING in str(warning.message) for warning in caught)
    samples = case.steps * case.batch
    rates = [samples / clock.seconds[epoch] for epoch in range(2, 2 + timed_epochs)]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    data_mib = data.train.inputs.nbytes / 2**20  # type: ignore[union-attr]
    return Result(rates, data_mib, clock.seconds[1], trainer.state.compile_seconds if case.compile else None, peak, syncs)


def report(case: Case, result: Result, log_every: int) -> None:
    """One line per case, ``NAME: RATE samples/s ...``, then what else was measured."""
    extra = [f"[{min(result.rates):,.0f}-{max(result.rates):,.0f} over {len(result.rates)} epochs of {case.steps} steps]",
             f"training data {result.data_mib:,.1f} MiB", f"warm-up epoch {result.warmup_seconds:.2f} s"]
    if result.compile_seconds is not None:
        extra.append(f"compile {result.compile_seconds:.1f} s (first step, not in the rate)")
    if result.peak_gib is not None:
        extra.append(f"peak memory {result.peak_gib:.2f} GiB")
    print(f"{case.name}: {result.median:,.0f} samples/s  " + "; ".join(extra), flush=True)
    if result.syncs is not None:
        own = 1 + 2 * math.ceil(case.steps / log_every)
        verdict = "no sync per step" if result.syncs < case.steps else "A SYNC IN EVERY STEP"
        print(f"  host syncs in one audited epoch of {case.steps} steps: {result.syncs}: {verdict} (the trainer's "
              f"own are {own}: the epoch's order upload, and per loss log every {log_every} steps a sizes upload "
              "and the read-back)", flush=True)


def describe_device(device: torch.device) -> str:
    """The card's name and size (or the CPU's), for the report's first line."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{torch.cuda.get_device_name(device)} (compute capability {props.major}.{props.minor}, "
                f"{props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}")
    return f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def fp32_settings() -> str:
    """What "fp32" means on this build: convolutions and matmuls may run in TF32."""
    conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    conv_text = f"cudnn conv fp32_precision={conv}" if conv is not None else f"cudnn allow_tf32={torch.backends.cudnn.allow_tf32}"
    return (f"{conv_text}, matmul precision={torch.get_float32_matmul_precision()}, "
            f"cudnn.benchmark={torch.backends.cudnn.benchmark} (PyTorch's defaults; the trainer changes none)")


def cases(args: argparse.Namespace) -> dict[str, list[Case]]:
    """The cases of each ``--only`` group, in the order they run."""
    quick = args.quick
    cnn_shape = (3, 32, 32)
    side = 32 if quick and args.resnet_size is None else (args.resnet_size or 224)
    resnet_shape = (3, side, side)
    cnn_batch, cnn_steps = (16, 2) if quick else (512, args.cnn_steps)
    res_batch, res_steps = (4, 1) if quick else (256, args.resnet_steps)
    seed_cnn = Case(f"seed CNN 3x32x32, batch {cnn_batch}, eager", build_convnet, cnn_shape, 10, cnn_batch, cnn_steps)
    cnn = [dataclasses.replace(seed_cnn, name=f"seed CNN 3x32x32, batch {cnn_batch}, written by hand", hand_written=True),
           seed_cnn,
           dataclasses.replace(seed_cnn, name=f"seed CNN 3x32x32, batch {cnn_batch}, whole-step CUDA graph", cuda_graph=True)]
    if not quick or args.compile_too:
        cnn += [dataclasses.replace(seed_cnn, name=f"seed CNN 3x32x32, batch {cnn_batch}, compiled", compile=True),
                dataclasses.replace(seed_cnn, name=f"seed CNN 3x32x32, batch {cnn_batch}, compiled, reduce-overhead",
                                    compile=True, compile_mode="reduce-overhead")]
    name = f"ResNet-18 3x{side}x{side}, batch {res_batch}"
    resnet = [
        Case(f"{name}, fp32", build_resnet18, resnet_shape, 1000, res_batch, res_steps),
        Case(f"{name}, bf16 + channels-last", build_resnet18, resnet_shape, 1000, res_batch, res_steps,
             precision="bf16", channels_last=True),
    ]
    if args.cudnn_benchmark_too:
        resnet += [dataclasses.replace(case, name=f"{case.name}, cudnn.benchmark", cudnn_benchmark=True) for case in resnet]
    # What else moves the seed CNN's rate: cuDNN's search, bf16, CUDA graphs, a batch that amortises launches.
    big_batch, big_steps = (64, 2) if quick else (2048, max(1, cnn_steps // 4))
    cnn_more = [
        dataclasses.replace(seed_cnn, name=f"{seed_cnn.name}, cudnn.benchmark", cudnn_benchmark=True),
        dataclasses.replace(seed_cnn, name=f"{seed_cnn.name}, bf16 + channels-last, cudnn.benchmark", precision="bf16",
                            channels_last=True, cudnn_benchmark=True),
        dataclasses.replace(seed_cnn, name=f"seed CNN 3x32x32, batch {big_batch}, eager", batch=big_batch,
                            steps=big_steps),
    ]
    if not quick or args.compile_too:
        cnn_more.insert(2, dataclasses.replace(
            seed_cnn, name=f"seed CNN 3x32x32, batch {cnn_batch}, compiled, reduce-overhead, cudnn.benchmark",
            compile=True, compile_mode="reduce-overhead", cudnn_benchmark=True))
    return {"cnn": cnn, "cnn-more": cnn_more, "resnet": resnet}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, cpu, ...")
    parser.add_argument("--only", default="cnn,resnet", help="comma-separated cases: cnn, resnet (default both), cnn-more (the seed CNN with "
                             "cudnn.benchmark, bf16, CUDA graphs, and at batch 2048)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps: checks the script, numbers mean nothing")
    parser.add_argument("--cudnn-benchmark-too", action="store_true",
                        help="also time both ResNet-18 cases with torch.backends.cudnn.benchmark on")
    parser.add_argument("--compile-too", action="store_true", help="with --quick: also the compiled CNN (slow on a CPU)")
    parser.add_argument("--epochs", type=int, default=None, help="timed epochs per case (default 5; 2 with --quick)")
    parser.add_argument("--cnn-steps", type=int, default=200, help="CNN steps per epoch (default 200)")
    parser.add_argument("--resnet-steps", type=int, default=10, help="ResNet-18 steps per epoch (default 10)")
    parser.add_argument("--resnet-size", type=int, default=None, help="ResNet-18 image side (default 224; 32 with --quick)")
    args = parser.parse_args()
    wanted = [name.strip() for name in args.only.split(",") if name.strip()]
    all_cases = cases(args)
    unknown = [name for name in wanted if name not in all_cases]
    if unknown or not wanted:
        parser.error(f"--only takes cnn, cnn-more and/or resnet, comma-separated (got {args.only!r})")
    for option in ("epochs", "cnn_steps", "resnet_steps", "resnet_size"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1 (got {value})")
    timed_epochs = args.epochs or (2 if args.quick else 5)
    try:
        device = select_device(args.device)
    except TrainerError as exc:  # no such device here: one line, exit 2 like the CLI's usage errors
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    log_every = RunConfig().log_every_n_steps

    print(f"throughput through Trainer: torch {torch.__version__}, device {device}: {describe_device(device)}")
    print(f"fp32 math: {fp32_settings()}")
    print("data: synthetic random uint8 images and labels generated on the device and resident there, batched by "
          "indexing and normalised per batch by the trainer; this measures speed, not accuracy")
    print(f"each case: SGD (momentum 0.9), 1 warm-up epoch (not timed), then {timed_epochs} timed epochs; the device is "
          "synchronised at each timed epoch's start and end; evaluations are not timed; rate = median over the epochs")
    if args.quick:
        print("QUICK MODE: tiny sizes to check the script; the numbers mean nothing"
              + ("" if args.compile_too else "; compilation skipped (--compile-too runs it)"))
    print(flush=True)
    one_graph = launch_report(device) if device.type == "cuda" and "cnn" in wanted else None
    results: dict[str, Result] = {}
    failed = []
    for group in wanted:
        for case in all_cases[group]:
            audit = device.type == "cuda" and group == "cnn" and not case.compile and not case.hand_written
            try:
                if case.hand_written:
                    results[case.name] = result = run_hand_written(case, device, timed_epochs)
                else:
                    results[case.name] = result = run_case(case, device, timed_epochs, audit)
            except Exception as exc:  # one case's failure (out of memory, a compiler error) must not lose the others
                traceback.print_exc()
                first_line = (str(exc).strip().splitlines() or [""])[0]
                print(f"{case.name}: FAILED ({type(exc).__name__}: {first_line})", flush=True)
                failed.append(case.name)
                continue
            report(case, result, log_every)
    print()
    cnn = [results.get(case.name) for case in all_cases["cnn"]] if "cnn" in wanted else []
    hand, eager, *compiled = cnn or [None, None]
    if eager is not None:
        print(f"seed CNN eager: {eager.median:,.0f} samples/s (target >= {CNN_TARGET:,} on an H100-class card)")
        if hand is not None:
            print(f"seed CNN eager through the trainer / written by hand: {eager.median / hand.median:.3f}x")
        for case, result in zip(all_cases["cnn"][2:], compiled):
            if result is not None:
                print(f"{case.name} / eager: {result.median / eager.median:.2f}x ({result.median:,.0f} samples/s)")
    graphed = results.get(all_cases["cnn"][2].name) if "cnn" in wanted else None
    if graphed is not None and one_graph is not None:
        print(f"seed CNN whole-step CUDA graph through the trainer / the step captured by hand as one graph: "
              f"{graphed.median / one_graph:.3f} (target >= {GRAPH_TARGET:.2f}; both in this run, on this card)")
    resnet = [results.get(case.name) for case in all_cases["resnet"]] if "resnet" in wanted else []
    for fp32, mixed, how in zip(resnet[0::2], resnet[1::2], ["", ", both with cudnn.benchmark"]):
        if fp32 is not None and mixed is not None:
            print(f"ResNet-18 bf16 + channels-last / fp32{how}: {mixed.median / fp32.median:.2f}x "
                  f"(target >= {RESNET_TARGET:.0f}x)")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
