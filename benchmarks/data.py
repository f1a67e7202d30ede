"""Data path: the seed's per-sample pipeline vs. our in-memory batches, on real Fashion-MNIST.

    python benchmarks/data.py [--epochs 2] [--threads N]

(a) the seed's MNIST program: ``torchvision.datasets.FashionMNIST`` with a
    per-sample ``ToTensor`` in a ``DataLoader`` (batch 100, shuffled), the MLP
    (784 -> 100 -> 10), Adam lr 0.001, the seed's loop;
(b) the ``fashion-mnist-mlp`` setup through our ``Trainer``: the same model,
    optimizer and batch size, images held in memory as uint8 and batched by
    indexing.

It prints seconds per training epoch for both, the ratio, and the validation
accuracy each reaches after ``--epochs`` epochs.  Needs the Debian package
``dataset-fashion-mnist`` (or ``--data-root`` with the four IDX files).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import shutil
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
from trainer_core.trainer import Trainer

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
BATCH, LR, SEED = 100, 0.001, 0


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--data-root", type=Path, default=DEFAULT_ROOT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
