"""The freeze plugin's speed-up: an epoch of the hymenoptera recipe with a frozen
ResNet-18 backbone against the same recipe training it whole.

    python benchmarks/freeze.py [--settings 224x4,64x32] [--epochs 2] [--repeats 3]
        [--folder-size 244,154] [--threads 1]

Each run is a real ``trainer run --config recipes/hymenoptera-resnet18.toml``
in a fresh interpreter (the CLI's own code, with one more plugin registered: a
clock), on one image folder: 244 training and 154 validation PNGs of sandals
and sneakers written from Fashion-MNIST (the hymenoptera folder's size,
``benchmarks/data.py``'s ``sandal_sneaker_folder``).  ImageNet weights cannot be
read offline, so both start from random weights (``-o model.weights=none``):
the same work per step.  The variants, in turn within each repeat so the
machine's other load hits both (which goes first swaps every repeat):

* frozen: the recipe as it is (freeze on: only ``fc``, 1,026 parameters, trains);
* whole: the same with ``--plugins no:freeze`` (all 11,177,538 parameters train).

For each setting of ``--settings`` (``SIZExBATCH``: the recipe's
``dataset.image_size`` and ``--batch-size``; the recipe's own is ``224x4``) it
prints each variant's seconds per epoch -- a whole epoch (``on_epoch_start`` to
the end of ``on_epoch_end``: training, validation and the checkpoint plugin's
saves) and training alone (to ``on_eval_start``) -- and the ratio whole /
frozen within the repeat, for the first epoch (warm-up: the allocator, oneDNN's
kernels) and the mean of the later ones.  At the end: the median and range of
those ratios over the repeats.  Start-up (imports, listing the folder,
building the model) is in no epoch.  Absolute times depend on what else the
machine runs (the load average is printed); the ratios are what to read.

Each run uses ``--threads`` torch threads (1 by default: on a 2-core machine
shared with other work, two threads per process wait on each other and the
times swing far more; ``--threads 0`` leaves torch's default) and the loader
processes ``trainer run`` picks for that.  The defaults take about 10 minutes
on a 2-core CPU.  Needs the Debian package ``dataset-fashion-mnist`` (or
``--data-root`` with the four IDX files).  ``--settings 16x4 --folder-size 4,4
--epochs 1 --repeats 1`` is a quick check that it runs
(``tests/test_benchmark_freeze.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

PARTS = {"first epoch": slice(0, 1), "later epochs": slice(1, None)}
WHATS = {"epoch": "train+val", "train": "training alone"}
VARIANTS = {"frozen": ("recipe as is (freeze on)", ()), "whole": ("--plugins no:freeze", ("--plugins", "no:freeze"))}


def load_data_benchmark() -> ModuleType:
    """``benchmarks/data.py`` (a script beside this one, not a package module)."""
    spec = importlib.util.spec_from_file_location("data_benchmark", Path(__file__).resolve().parent / "data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child(clock_file: Path, args: list[str]) -> None:
    """In the child process: ``trainer run ARGS`` with a clock plugin that writes
    each epoch's seconds (whole and training alone) to ``clock_file``."""
    import pluggy

    from trainer_core import hookimpl
    from trainer_core.cli import make_cli
    from trainer_core.pluginmanager import make_plugin_manager

    epochs: list[dict[str, float]] = []

    class Clock:
        started, trained = 0.0, None

        @hookimpl(tryfirst=True)
        def on_epoch_start(self) -> None:
            self.started, self.trained = time.perf_counter(), None

        @hookimpl(tryfirst=True)
        def on_eval_start(self) -> None:  # (checkpoint's evaluation of the best weights comes after the last epoch)
            if self.trained is None:
                self.trained = time.perf_counter() - self.started

        @hookimpl(trylast=True)
        def on_epoch_end(self) -> None:
            epochs.append({"epoch": time.perf_counter() - self.started, "train": self.trained})

        @hookimpl
        def on_fit_end(self) -> None:
            clock_file.write_text(json.dumps(epochs))

    def pm_factory() -> pluggy.PluginManager:
        pm = make_plugin_manager()
        pm.register(Clock(), name="benchmark-clock")
        return pm

    make_cli(pm_factory)(args, prog_name="trainer")


def trainer_epochs(recipe: Path, folder: Path, size: int, batch: int, epochs: int, runs: Path,
                   *options: str) -> tuple[list[dict[str, float]], str]:
    """One ``trainer run --config RECIPE`` on ``folder``; returns each epoch's
    seconds (``epoch``, ``train``) and the freeze plugin's line (or '')."""
    runs.mkdir(exist_ok=True)
    name = f"run{len(list(runs.iterdir()))}"
    clock = runs / f"{name}.json"
    command = [sys.executable, __file__, "--child", str(clock), "--",
               "run", "--config", str(recipe), "--data-root", str(folder), "-o", "model.weights=none",
               "-o", f"dataset.image_size={size}", "--batch-size", str(batch), "--epochs", str(epochs),
               "--runs-root", str(runs), "--name", name, *options]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not clock.exists():
        raise SystemExit(f"trainer run failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    seconds = json.loads(clock.read_text())
    if len(seconds) != epochs:
        raise SystemExit(f"expected {epochs} epochs, timed {len(seconds)}:\n{done.stdout}")
    line = next((x.strip() for x in done.stdout.splitlines() if x.startswith("freeze:")), "")
    return seconds, line


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x [{min(values):.2f}-{max(values):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="224x4,64x32",
                        type=lambda text: [tuple(int(n) for n in s.split("x")) for s in text.split(",")],
                        help="SIZExBATCH pairs, comma-separated (the recipe's own: 224x4)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="times to run both variants, in turn")
    parser.add_argument("--folder-size", type=lambda text: [int(x) for x in text.split(",")], default=[244, 154],
                        help="training and validation images, comma-separated")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in each run (0: torch's default); 1 is steadiest on a shared machine")
    parser.add_argument("--data-root", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child is not None:
        child(args.child, rest[1:] if rest[:1] == ["--"] else rest)
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # (the trainer's processes)
    import torch

    data = load_data_benchmark()
    threads = args.threads or torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} thread(s) and {data.default_workers(torch.device('cpu'))} loader "
          f"process(es) a run, {len(os.sched_getaffinity(0))} core(s), CPU, "
          f"load average {os.getloadavg()[0]:.1f} at start; sandal-vs-sneaker folder {args.folder_size[0]}/"
          f"{args.folder_size[1]} PNGs (28x28 Fashion-MNIST, resized); trainer run --config "
          f"recipes/hymenoptera-resnet18.toml -o model.weights=none (random init), {args.epochs} epoch(s), "
          f"{args.repeats} repeat(s); ratio = whole / frozen (> 1: frozen is faster)")
    ratios: dict[tuple[int, int], dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = data.sandal_sneaker_folder(Path(tmp) / "sandal-sneaker", *args.folder_size, data_root=args.data_root)
        for size, batch in args.settings:
            found = ratios.setdefault((size, batch), {})
            for repeat in range(args.repeats):
                rows, lines = {}, {}
                for key in list(VARIANTS)[::1 if repeat % 2 == 0 else -1]:  # who goes first swaps each repeat
                    rows[key], lines[key] = trainer_epochs(data.RECIPE, folder, size, batch, args.epochs,
                                                           Path(tmp) / "runs", *VARIANTS[key][1])
                print(f"{size} px, batch {batch}, repeat {repeat + 1} (load average {os.getloadavg()[0]:.1f}): "
                      f"seconds per epoch, whole epoch (train + val + checkpoints) / training alone")
                for key, (label, _) in VARIANTS.items():
                    cells = ", ".join(f"{e['epoch']:.2f} / {e['train']:.2f}" for e in rows[key])
                    print(f"  {key:<6} {label:<26} {cells}   {lines[key]}")
                cells = []
                for part, span in PARTS.items():
                    for what, label in WHATS.items():
                        whole = [e[what] for e in rows["whole"][span]]
                        frozen = [e[what] for e in rows["frozen"][span]]
                        if whole:
                            ratio = mean(whole) / mean(frozen)
                            found.setdefault(f"{part}, {label}", []).append(ratio)
                            cells.append(f"{part}, {label} {ratio:.2f}x")
                print(f"  ratio  {'; '.join(cells)}")
    print(f"ratio whole / frozen, median [min-max] over {args.repeats} repeat(s):")
    for (size, batch), found in ratios.items():
        print(f"  {size} px, batch {batch}: " + "; ".join(f"{name} {spread(v)}" for name, v in found.items()))


if __name__ == "__main__":
    main()
