"""Export the Fashion-MNIST classes the ``fashion-mnist-transfer-pretrain`` run
held out as an image folder (``train/<class>/*.png``, ``val/<class>/*.png``),
for the ``fashion-mnist-transfer`` recipe to fine-tune on.

The whole transfer-learning workflow of the seed, offline on real data::

    trainer run --recipe fashion-mnist-transfer-pretrain      # 8 classes -> runs/fashion-mnist-transfer-pretrain
    python recipes/fashion_mnist_transfer.py                  # its 2 held-out classes -> data/fashion-mnist-transfer
    trainer run --recipe fashion-mnist-transfer               # fine-tune the head on them

The held-out classes are one setting, the pretrain run's ``dataset.held_out``
(``-o dataset.held_out=sandal,sneaker`` to choose others): this script reads
them from that run's folder, so stage 2 never tests on classes stage 1 saw.
Training images are a few per class, drawn from the training set with a fixed
seed; validation images come from the test set.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from trainer_core_plugins.datasets.mnist import FASHION_MNIST, kept_classes, load_fashion_mnist, select_classes
from trainer_core.config import load_config
from trainer_core.errors import UsageError

PRETRAIN_RUN = Path("runs/fashion-mnist-transfer-pretrain")  # where the pretrain recipe's run goes


def held_out_by(run: Path) -> tuple[str, ...]:
    """The Fashion-MNIST classes the stage-1 run in folder ``run`` never trained on, from its saved config."""
    saved = run / "config.toml"
    if not saved.is_file():
        raise UsageError(f"{saved} not found: run stage 1 first (trainer run --recipe fashion-mnist-transfer-pretrain), "
                         f"or point --from-run at its run folder")
    config = load_config(saved)
    if config.dataset != "fashion-mnist":
        raise UsageError(f"the run in {run} trained on '{config.dataset}', not fashion-mnist; point --from-run at a stage-1 run")
    options = config.dataset_options
    try:
        keep = kept_classes(FASHION_MNIST.classes, options.get("classes"), options.get("held_out"))
    except ValueError as exc:
        raise UsageError(f"the run in {run}: {exc}") from None
    if keep is None:
        raise UsageError(f"the run in {run} trained on every Fashion-MNIST class, so none is new to it; "
                         f"pretrain with -o dataset.held_out=CLASS,CLASS")
    return tuple(name for index, name in enumerate(FASHION_MNIST.classes) if index not in keep)


def export(
    out: Path,
    classes: tuple[str, ...],
    per_class: int = 20,
    val_per_class: int = 500,
    data_root: Path | None = None,
    seed: int = 0,
) -> dict[str, int]:
    """Write ``per_class`` training and ``val_per_class`` validation PNGs of each
    class under ``out``; return the number of files per split.  ``out`` must not
    exist yet, so an earlier export is never mixed with or overwritten by this one."""
    from PIL import Image

    if per_class < 1 or val_per_class < 1:
        raise UsageError(f"--per-class and --val-per-class must be >= 1 (got {per_class}, {val_per_class})")
    if out.exists():
        raise UsageError(f"{out} already exists; remove it or choose another --out")
    data = load_fashion_mnist(data_root)
    wanted_classes = select_classes(data.classes, classes)
    generator = torch.Generator().manual_seed(seed)
    counts = {}
    partial = out.with_name(f".{out.name}.partial")  # renamed into place when complete
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted export
    for split, wanted in (("train", per_class), ("val", val_per_class)):
        tensors = getattr(data, split)
        counts[split] = 0
        for index in wanted_classes:
            name = data.classes[index]
            members = (tensors.targets == index).nonzero().flatten()
            if len(members) < wanted:
                raise UsageError(f"the {split} split has only {len(members)} images of {name}, fewer than {wanted}")
            chosen = members[torch.randperm(len(members), generator=generator)[:wanted]] if split == "train" else members[:wanted]
            folder = partial / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for sample in chosen.tolist():  # named by its index in the IDX file, to trace it back
                Image.fromarray(tensors.inputs[sample, 0].numpy()).save(folder / f"{sample:05d}.png")
            counts[split] += len(chosen)
    partial.rename(out)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/fashion-mnist-transfer"), help="folder to create")
    parser.add_argument("--from-run", type=Path, default=PRETRAIN_RUN,
                        help="the stage-1 run folder: its held-out classes are exported (default: %(default)s)")
    parser.add_argument("--classes", help="export only these of its held-out classes, comma-separated")
    parser.add_argument("--per-class", type=int, default=20, help="training images per class")
    parser.add_argument("--val-per-class", type=int, default=500, help="validation images per class")
    parser.add_argument("--data-root", type=Path, help="folder of the Fashion-MNIST IDX files")
    parser.add_argument("--seed", type=int, default=0, help="seed of the choice of training images")
    args = parser.parse_args(argv)
    try:
        held_out = held_out_by(args.from_run)
        classes = tuple(c.strip() for c in args.classes.split(",") if c.strip()) if args.classes else held_out
        seen = [c for c in classes if c not in held_out]
        if seen:  # the pretrained model has learned them: no test of transfer
            raise UsageError(f"{', '.join(seen)} not held out by the run in {args.from_run} (it held out "
                             f"{', '.join(held_out)}); pretrain with -o dataset.held_out=... naming the classes to export")
        counts = export(args.out, classes, args.per_class, args.val_per_class, args.data_root, args.seed)
    except (UsageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {counts['train']} training and {counts['val']} validation images of {', '.join(classes)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
