"""Data path: the seed's per-sample pipelines vs. ours, on real Fashion-MNIST.

    python benchmarks/data.py [--epochs 2] [--threads N]
    python benchmarks/data.py --case imagefolder [--sizes 28,64] [--epochs 3] [--repeats 1] [--threads N]
        [--folder-size 244,154]

``--case mlp`` (the default):

(a) the seed's MNIST program: ``torchvision.datasets.FashionMNIST`` with a
    per-sample ``ToTensor`` in a ``DataLoader`` (batch 100, shuffled), the MLP
    (784 -> 100 -> 10), Adam lr 0.001, the seed's loop;
(b) the ``fashion-mnist-mlp`` setup through our ``Trainer``: the same model,
    optimizer and batch size, images held in memory as uint8 and batched by
    indexing.

It prints seconds per training epoch for both, the ratio, and the validation
accuracy each reaches after ``--epochs`` epochs.

``--case imagefolder``: the seed's transfer-learning program (its program (2))
against ``trainer run --config recipes/hymenoptera-resnet18.toml`` on one image
folder: 244 training and 154 validation PNGs of sandals and sneakers written
from Fashion-MNIST (the hymenoptera folder's size), each image size of
``--sizes`` (the recipe's ``dataset.image_size``; the seed's 224 is
``--sizes 224``).  ImageNet weights cannot be read offline, so both start from
random weights (``model.weights=none``): the same work per step.  Variants, in
turn within each repeat: (s) the seed's program in this process (its
transforms, ``DataLoader(batch_size=4, shuffle=True, num_workers=0)``, frozen
backbone, SGD 0.001, StepLR 7/0.1, best weights copied); (t) ``trainer run``
with the defaults (loader processes: the cores the threads leave free); (t1)
the same with ``--num-workers 1`` (the default before issue 17); (c) with
``-o dataset.cache=true``; and (m) the seed's steps alone on batches made
before each epoch's clock starts: what no data path can beat.  It prints each
one's seconds a whole epoch (training and validation) and the ratios to (s)
of the first epoch and of the mean of the others.  A run's start (imports, listing or decoding
the folder) is reported apart, as "setup".

Both need the Debian package ``dataset-fashion-mnist`` (or ``--data-root``
with the four IDX files).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision import transforms

from trainer_core_plugins.datasets.mnist import FILES, load_fashion_mnist
from trainer_core_plugins.models.mlp import build as build_mlp
from trainer_core.config import RunConfig
from trainer_core.loading import default_workers
from trainer_core.trainer import Trainer

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
BATCH, LR, SEED = 100, 0.001, 0
ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "hymenoptera-resnet18.toml"


def torchvision_layout(source: Path, folder: Path) -> Path:
    """Unpacked IDX files where ``torchvision.datasets.FashionMNIST`` looks (``FashionMNIST/raw``)."""
    raw = folder / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FILES.values():
        packed, plain = source / f"{name}.gz", source / name
        if packed.exists():
            with gzip.open(packed) as src, open(raw / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copy(plain, raw / name)
    return folder


def seed_pipeline(root: Path, epochs: int) -> tuple[list[float], float]:
    """The seed's program, timed per epoch; returns (seconds per epoch, accuracy)."""
    torch.manual_seed(SEED)
    train = torchvision.datasets.FashionMNIST(root, train=True, transform=transforms.ToTensor(), download=False)
    test = torchvision.datasets.FashionMNIST(root, train=False, transform=transforms.ToTensor(), download=False)
    train_loader = torch.utils.data.DataLoader(train, batch_size=BATCH, shuffle=True)
    test_loader = torch.utils.data.DataLoader(test, batch_size=BATCH, shuffle=False)
    model = build_mlp((1, 28, 28), 10)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    seconds = []
    for _ in range(epochs):
        started = time.perf_counter()
        for images, labels in train_loader:
            outputs = model(images.reshape(-1, 28 * 28))
            loss = criterion(outputs, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - started)
    correct = 0
    with torch.no_grad():
        for images, labels in test_loader:
            correct += (model(images.reshape(-1, 28 * 28)).argmax(1) == labels).sum().item()
    return seconds, correct / len(test)


def ours(root: Path, epochs: int) -> tuple[list[float], float]:
    data = load_fashion_mnist(data_root=root)
    torch.manual_seed(SEED)
    model = build_mlp((1, 28, 28), 10)
    config = RunConfig(model="mlp", dataset="fashion-mnist", epochs=epochs, batch_size=BATCH, lr=LR,
                       optimizer="adam", seed=SEED, device="cpu", plugins={})
    trainer = Trainer(model, data, config)
    seconds = []

    class EpochClock:
        from trainer_core import hookimpl

        @hookimpl
        def on_epoch_start(self) -> None:
            self.started = time.perf_counter()

        @hookimpl(tryfirst=True)
        def on_eval_start(self) -> None:
            seconds.append(time.perf_counter() - self.started)

    trainer.pm.register(EpochClock(), name="clock")
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit()
    return seconds, trainer.state.metrics["val/acc"]


def sandal_sneaker_folder(out: Path, train: int = 244, val: int = 154, data_root: Path | None = None) -> Path:
    """Write an image folder of Fashion-MNIST sandals and sneakers at ``out``:
    ``train`` training PNGs (from the training set, drawn with seed 0) and ``val``
    validation PNGs (from the test set), half of each class (by default the
    hymenoptera folder's 244 and 154), through ``recipes/fashion_mnist_transfer.py``."""
    spec = importlib.util.spec_from_file_location("fashion_mnist_transfer", ROOT / "recipes" / "fashion_mnist_transfer.py")
    assert spec is not None and spec.loader is not None
    exporter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exporter)
    exporter.export(out, ("sandal", "sneaker"), train // 2, val // 2, data_root)
    return out


def seed_transfer_program(data_dir: Path, size: int, epochs: int,
                          data_seconds: list[float] | None = None) -> tuple[list[float], float]:
    """The seed's program (2), as it wrote it but for the image size (``size``;
    the seed's 224 and 256 are ``size`` and ``size * 8 / 7``) and random weights;
    returns (seconds per epoch, best validation accuracy).  With ``data_seconds``
    each epoch's batches are made before its clock starts (the time that takes
    is appended to it), so the time is the steps' alone: the least any data
    path could cost."""
    import numpy as np
    from torch.optim import lr_scheduler
    from torchvision import datasets, models

    torch.manual_seed(SEED)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    data_transforms = {
        "train": transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                     transforms.ToTensor(), transforms.Normalize(mean, std)]),
        "val": transforms.Compose([transforms.Resize(round(size * 8 / 7)), transforms.CenterCrop(size),
                                   transforms.ToTensor(), transforms.Normalize(mean, std)]),
    }
    image_datasets = {x: datasets.ImageFolder(os.path.join(data_dir, x), data_transforms[x]) for x in ["train", "val"]}
    dataloaders = {x: torch.utils.data.DataLoader(image_datasets[x], batch_size=4, shuffle=True, num_workers=0)
                   for x in ["train", "val"]}
    dataset_sizes = {x: len(image_datasets[x]) for x in ["train", "val"]}
    model = models.resnet18(weights=None)
    for param in model.parameters():
        param.requires_grad = False
    model.fc = nn.Linear(model.fc.in_features, 2)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    scheduler = lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    best_model_wts, best_acc, seconds = copy.deepcopy(model.state_dict()), 0.0, []
    for epoch in range(epochs):
        made = time.perf_counter()
        ready = {x: list(dataloaders[x]) for x in dataloaders} if data_seconds is not None else dataloaders
        if data_seconds is not None:
            data_seconds.append(time.perf_counter() - made)
        started = time.perf_counter()
        for phase in ["train", "val"]:
            model.train() if phase == "train" else model.eval()
            running_loss, running_corrects = 0.0, 0
            for inputs, labels in ready[phase]:
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    _, preds = torch.max(outputs, 1)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        optimizer.zero_grad()
                        loss.backward()
                        optimizer.step()
                running_loss += loss.item() * inputs.size(0)
                running_corrects += torch.sum(preds == labels.data)
            if phase == "train":
                scheduler.step()
            epoch_acc = float(running_corrects.double() / dataset_sizes[phase])
            if phase == "val" and epoch_acc > best_acc:
                best_acc, best_model_wts = epoch_acc, copy.deepcopy(model.state_dict())
        seconds.append(time.perf_counter() - started)
    model.load_state_dict(best_model_wts)
    return seconds, best_acc


def trainer_run(data_dir: Path, size: int, epochs: int, runs: Path, *options: str) -> tuple[float, list[float], float]:
    """``trainer run`` of the hymenoptera recipe on ``data_dir``, timed from its
    output lines; returns (setup seconds, seconds per epoch, best val accuracy)."""
    runs.mkdir(exist_ok=True)
    name = f"run{len(list(runs.iterdir()))}"
    command = [sys.executable, "-m", "trainer_core", "run", "--config", str(RECIPE), "--data-root", str(data_dir),
               "-o", "model.weights=none", "-o", f"dataset.image_size={size}", "--epochs", str(epochs),
               "--runs-root", str(runs), "--name", name, *options]
    started, marks, lines = time.perf_counter(), [], []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}) as process:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if line.startswith(("training ", "epoch ")):  # the run starts; an epoch ends
                marks.append(time.perf_counter())
    if process.returncode != 0 or len(marks) != epochs + 1:
        raise SystemExit(f"trainer run failed ({process.returncode}):\n{''.join(lines)}")
    best = json.loads((runs / name / "summary.json").read_text())["best"]["val/acc"]["value"]
    return marks[0] - started, [b - a for a, b in zip(marks, marks[1:])], best


def compare_imagefolder(args: argparse.Namespace) -> None:
    """``--case imagefolder``: see the module's docstring."""
    variants = {"s": "seed's program (2), num_workers=0", "m": "(s)'s steps alone, batches made beforehand",
                "t": f"trainer run, defaults ({default_workers(torch.device('cpu'))} loader processes)",
                "t1": "trainer run --num-workers 1 (old default)", "c": "trainer run -o dataset.cache=true"}
    options = {"t": (), "t1": ("--num-workers", "1"), "c": ("-o", "dataset.cache=true")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {len(os.sched_getaffinity(0))} core(s), CPU, "
          f"load average {os.getloadavg()[0]:.1f} at start; sandal-vs-sneaker folder "
          f"{args.folder_size[0]}/{args.folder_size[1]} PNGs (28x28 Fashion-MNIST), "
          f"ResNet-18 random init, frozen but fc, batch 4, SGD 0.001, StepLR 7/0.1, {args.epochs} epochs")
    with tempfile.TemporaryDirectory() as tmp:
        folder = sandal_sneaker_folder(Path(tmp) / "sandal-sneaker", *args.folder_size, data_root=args.data_root)
        for size in args.sizes:
            for repeat in range(args.repeats):
                rows, data_seconds = {}, []
                for key in variants:
                    if key in ("s", "m"):
                        rows[key] = (0.0, *seed_transfer_program(folder, size, args.epochs,
                                                                 data_seconds if key == "m" else None))
                    else:
                        rows[key] = trainer_run(folder, size, args.epochs, Path(tmp) / "runs", *options[key])
                print(f"{size} px, repeat {repeat + 1}: seconds per epoch (train + val); ratio = (s) / variant "
                      f"(> 1: faster than the seed's program); load average {os.getloadavg()[0]:.1f}")
                seed_first, seed_rest = rows["s"][1][0], rows["s"][1][1:]
                for key, (setup, seconds, best) in rows.items():
                    rest = seconds[1:]
                    later = (f"; later epochs mean {sum(rest) / len(rest):.2f} s, ratio "
                             f"{(sum(seed_rest) / len(seed_rest)) / (sum(rest) / len(rest)):.2f}x") if rest else ""
                    print(f"  ({key:>2}) {variants[key]:<44} setup {setup:5.2f} s; epochs "
                          f"{', '.join(f'{x:.2f}' for x in seconds)}; first ratio {seed_first / seconds[0]:.2f}x"
                          f"{later}; best val acc {best:.3f}")
                share = sum(data_seconds) / (sum(data_seconds) + sum(rows["m"][1]))
                print(f"  (m) made its batches in {', '.join(f'{x:.2f}' for x in data_seconds)} s: {share:.0%} of its "
                      f"time, so no data path can make the seed's epochs more than {1 / (1 - share):.2f}x faster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("mlp", "imagefolder"), default="mlp")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--data-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--sizes", type=lambda text: [int(x) for x in text.split(",")], default=[28, 64],
                        help="imagefolder: image sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=1, help="imagefolder: times to run the variants, in turn")
    parser.add_argument("--folder-size", type=lambda text: [int(x) for x in text.split(",")], default=[244, 154],
                        help="imagefolder: training and validation images, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # (the trainer's processes, in --case imagefolder)
    if args.case == "imagefolder":
        compare_imagefolder(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = torchvision_layout(args.data_root, Path(tmp))
        seed_seconds, seed_acc = seed_pipeline(root, args.epochs)
        our_seconds, our_acc = ours(args.data_root, args.epochs)
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU; Fashion-MNIST 60,000/10,000; "
          f"MLP 784-100-10, Adam {LR}, batch {BATCH}, {args.epochs} epochs")
    print(f"  (a) seed pipeline (ToTensor per sample, DataLoader): "
          f"{', '.join(f'{s:.2f}' for s in seed_seconds)} s/epoch, val acc {seed_acc:.4f}")
    print(f"  (b) trainer-core (in-memory uint8, batched indexing): "
          f"{', '.join(f'{s:.2f}' for s in our_seconds)} s/epoch, val acc {our_acc:.4f}")
    print(f"  ratio (a)/(b), mean epoch: {sum(seed_seconds) / sum(our_seconds):.1f}x faster")


if __name__ == "__main__":
    main()
