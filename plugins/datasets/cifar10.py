"""CIFAR-10 from its standard python-pickle batches, held in memory as uint8.

The files are those of ``cifar-10-python.tar.gz`` extracted: a folder
``cifar-10-batches-py`` with ``data_batch_1`` ... ``data_batch_5``,
``test_batch`` and ``batches.meta``.  ``--data-root`` may be that folder or
the folder that holds it (torchvision's ``root``).  The pickles are read with
an unpickler that only rebuilds numpy arrays, so a crafted file cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plugins.datasets.downloads import torchvision_download
from trainer_core import DataBundle, TensorSplit, UsageError

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
VAL_FILE = "test_batch"
META_FILE = "batches.meta"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_BYTES = 3 * 32 * 32
HOW_TO_GET = ("download and extract https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz there, "
              "or run again with -o dataset.download=true")


def load(data_root: Path | None = None, download: bool = False) -> DataBundle:
    """CIFAR-10, ``3 x 32 x 32``: 50,000 training and 10,000 validation (test) images,
    normalised with mean and std 0.5 per channel as in the seed program.

    :param data_root: ``cifar-10-batches-py`` or the folder holding it (default: ``./data``).
    :param download: fetch the archive with torchvision's downloader (needs a network).
    """
    root = data_root if data_root is not None else Path("data")
    folder = find_folder(root)
    if folder is None and download:
        folder = _download(root)
    if folder is None:
        names = ", ".join((*TRAIN_FILES, VAL_FILE))
        raise UsageError(f"cifar10 data not found: expected {names} in {root / FOLDER} (or in {root}); {HOW_TO_GET}, "
                         f"or point --data-root at the folder that holds them")
    train = [read_batch(folder / name) for name in TRAIN_FILES]
    classes = read_classes(folder / META_FILE)
    return DataBundle(
        train=TensorSplit(torch.cat([b.inputs for b in train]), torch.cat([b.targets for b in train])),
        val=read_batch(folder / VAL_FILE),
        classes=classes,
        input_shape=(3, 32, 32),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )


def find_folder(root: Path) -> Path | None:
    """The folder holding all six batch files: ``root/cifar-10-batches-py`` or ``root`` itself."""
    for folder in (root / FOLDER, root):
        if all((folder / name).is_file() for name in (*TRAIN_FILES, VAL_FILE)):
            return folder
    return None


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, bytes and numpy arrays; refuses every other global."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds only arrays")
        return super().find_class(module, name)


def _unpickle(path: Path) -> Any:
    try:
        with path.open("rb") as handle:
            return _ArrayUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, OSError) as exc:
        raise UsageError(f"{path} is damaged or not a CIFAR-10 batch ({type(exc).__name__}: {exc}); "
                         f"extract cifar-10-python.tar.gz again") from None


def read_batch(path: Path) -> TensorSplit:
    """One batch file: ``data`` (``N x 3072`` uint8, channel-major) and ``labels``."""
    batch = _unpickle(path)
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_BYTES \
            or labels is None or len(labels) != len(data):
        raise UsageError(f"{path} is not a CIFAR-10 batch: expected 'data' of N x {IMAGE_BYTES} bytes and N 'labels'; "
                         f"extract cifar-10-python.tar.gz again")
    targets = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if len(targets) and not 0 <= int(targets.min()) <= int(targets.max()) < len(CLASSES):
        raise UsageError(f"{path} has labels outside 0..{len(CLASSES) - 1}; extract cifar-10-python.tar.gz again")
    return TensorSplit(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), targets)


def read_classes(path: Path) -> list[str]:
    """Class names from ``batches.meta`` when present (the standard ones otherwise)."""
    if not path.is_file():
        return list(CLASSES)
    meta = _unpickle(path)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != len(CLASSES):
        raise UsageError(f"{path} has no list of {len(CLASSES)} 'label_names'; extract cifar-10-python.tar.gz again")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _download(root: Path) -> Path:
    torchvision_download("CIFAR10", root, "cifar10", "download and extract "
                         "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz there by hand")
    folder = find_folder(root)
    if folder is None:
        raise UsageError(f"cifar10: the download finished but {root / FOLDER} does not hold the six batch files")
    return folder
