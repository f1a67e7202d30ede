"""The task recipes against their baselines, measured in one run.

    python benchmarks/tasks.py [--seeds 0,1,2] [--skip-charlm] [--device cpu] [--keep DIR]

Trains each recipe with a real ``trainer run --recipe NAME`` in a fresh
interpreter, into a temporary folder (or ``--keep DIR``), and reads the
headline of its ``summary.json``; computes the baselines here, on the same
validation data the recipe's dataset options give:

* diabetes-mlp: R^2 of scikit-learn's least-squares linear regression on the
  diabetes validation split (``benchmarks/baselines.py``).  ``--seeds`` trains
  the recipe once per seed (initialisation and data order; the split stays).
* pydoc-charlm: unigram, bigram and trigram character count models, in bits
  per character on the validation windows of the recipe's ``block_size``,
  next to the model's ``val/bits_per_token``.

The table shows each run's best and final (last epoch) value of the metric, the
baselines and the wall time of the whole ``trainer run`` (start-up, data,
training, evaluation, checkpoints).  Times depend on what else the machine
runs: the load average before and after is printed with them.  Nothing here is
an expected number: the exit status is 1 only when a run fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DIABETES, CHARLM = "diabetes-mlp", "pydoc-charlm"


def load_baselines() -> ModuleType:
    """``benchmarks/baselines.py`` (a script beside this one, not a package module)."""
    spec = importlib.util.spec_from_file_location("baselines", Path(__file__).resolve().parent / "baselines.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe_path(name: str) -> Path:
    """The recipe file ``trainer run --recipe NAME`` reads when run from the checkout (as :func:`train` does)."""
    from trainer_core.recipes import find_recipe

    cwd = Path.cwd()
    try:
        os.chdir(ROOT)
        return find_recipe(name)
    finally:
        os.chdir(cwd)


def dataset_options(name: str, loader: Callable[..., Any]) -> dict[str, Any]:
    """The recipe's ``[dataset]`` options over the defaults of the dataset's ``loader``."""
    table = tomllib.loads(recipe_path(name).read_text(encoding="utf-8")).get("dataset", {})
    options = {key: p.default for key, p in inspect.signature(loader).parameters.items()
               if p.default is not inspect.Parameter.empty}
    options.update({key: value for key, value in table.items() if key != "name"})
    return options


@dataclass
class Run:
    recipe: str
    seed: int | None
    metric: str
    best: float
    best_epoch: int
    final: float
    epochs: int
    wall_s: float
    load_before: float
    load_after: float


def train(recipe: str, metric: str, folder: Path, seed: int | None, device: str | None) -> Run:
    """``trainer run --recipe RECIPE`` in a subprocess; its ``metric`` from summary.json."""
    run_dir = folder / (recipe if seed is None else f"{recipe}-seed{seed}")
    command = [sys.executable, "-m", "trainer_core", "run", "--recipe", recipe, "--run-dir", str(run_dir), "-q"]
    if seed is not None:
        command += ["--seed", str(seed)]
    if device is not None:
        command += ["--device", device]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    best = summary["best"][metric]
    return Run(recipe, seed, metric, best["value"], best["epoch"], summary["final"][metric], summary["epochs"],
               wall, load_before, os.getloadavg()[0])


def diabetes_baselines(baselines: ModuleType) -> dict[str, float]:
    from trainer_core_plugins.datasets.tabular import load_diabetes

    options = dataset_options(DIABETES, load_diabetes)
    return {"linear regression": baselines.diabetes_linear_r2(options["val_fraction"], options["split_seed"])}


def charlm_baselines(baselines: ModuleType) -> tuple[dict[str, float], int]:
    from trainer_core_plugins.datasets import pydoc_chars

    options = dataset_options(CHARLM, pydoc_chars.load)
    text = pydoc_chars.corpus_text()
    vocabulary = pydoc_chars.vocabulary(text)
    train_text, val_text = pydoc_chars.split_text(text, options["val_fraction"])
    bits = {name: baselines.ngram_bits_per_char(order, train_text, val_text, vocabulary, options["block_size"])
            for order, name in ((1, "unigram"), (2, "bigram"), (3, "trigram"))}
    return bits, options["block_size"]


def row(run: Run, reference: dict[str, float], higher_is_better: bool) -> str:
    strongest = max(reference.values()) if higher_is_better else min(reference.values())
    beats = run.best > strongest if higher_is_better else run.best < strongest
    refs = ", ".join(f"{name} {value:.3f}" for name, value in reference.items())
    seed = "-" if run.seed is None else str(run.seed)
    return (f"{run.recipe:13s} {seed:>4s}  {run.metric:18s} {run.best:7.3f} (ep {run.best_epoch:>3d}/{run.epochs:<3d}) "
            f"{run.final:7.3f}  {'yes' if beats else 'NO':5s} {run.wall_s:7.1f}  {run.load_before:4.1f}/{run.load_after:<4.1f}  "
            f"{refs}")


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers (got {text!r})") from None
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds needs at least one seed")
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=parse_seeds, default=[0],
                        help="training seeds of diabetes-mlp, comma-separated (default 0; e.g. 0,1,2)")
    parser.add_argument("--skip-charlm", action="store_true", help="leave out pydoc-charlm (minutes of training)")
    parser.add_argument("--device", default=None, help="--device for the runs (default: the recipes' own, auto)")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="write the run folders under DIR and keep them (default: a temporary folder)")
    args = parser.parse_args(argv)

    baselines = load_baselines()
    temporary = None if args.keep else tempfile.TemporaryDirectory(prefix="trainer-tasks-")
    folder = args.keep or Path(temporary.name)  # type: ignore[union-attr]
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    try:
        print(f"training on {os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f}); run folders in {folder}",
              flush=True)
        reference = diabetes_baselines(baselines)
        for seed in args.seeds:
            run = train(DIABETES, "val/r2", folder, seed, args.device)
            lines.append(row(run, reference, higher_is_better=True))
            print(f"  {DIABETES} seed {seed}: {run.wall_s:.1f} s", flush=True)
        if not args.skip_charlm:
            bits, block_size = charlm_baselines(baselines)
            run = train(CHARLM, "val/bits_per_token", folder, None, args.device)
            lines.append(row(run, bits, higher_is_better=False))
            print(f"  {CHARLM}: {run.wall_s:.1f} s (baselines on windows of {block_size} characters)", flush=True)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        if temporary is not None:
            temporary.cleanup()

    print()
    print(f"{'recipe':13s} {'seed':>4s}  {'metric':18s} {'best':>7s} {'(epoch)':13s} {'final':>7s}  {'beats':5s} "
          f"{'wall s':>7s}  {'load':9s}  baselines (same validation data)")
    for line in lines:
        print(line)
    print("best: the best epoch's value (the weights the checkpoint plugin restores); final: the last epoch's; "
          "beats: best is better than every baseline; wall s: the whole trainer run; load: 1-minute load average "
          "before/after the run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
