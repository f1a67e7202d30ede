"""MNIST and Fashion-MNIST from their standard IDX files, held in memory as uint8.

Each dataset is four files, gzip-compressed (``.gz``) or not::

    train-images-idx3-ubyte  train-labels-idx1-ubyte  t10k-images-idx3-ubyte  t10k-labels-idx1-ubyte

They are looked for in ``--data-root`` itself and in torchvision's layout under
it (``MNIST/raw/``, ``FashionMNIST/raw/``), so a folder torchvision downloaded
into works as is.  Without ``--data-root``, Fashion-MNIST is also found where
Debian's ``dataset-fashion-mnist`` package installs it.  The 60,000 training
images train and the 10,000 test images validate, as in the seed program.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from trainer_core_plugins.datasets.downloads import torchvision_download
from trainer_core import DataBundle, TensorSplit, UsageError

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "val_images": "t10k-images-idx3-ubyte",
    "val_labels": "t10k-labels-idx1-ubyte",
}
UBYTE = 0x08  # the IDX type code of unsigned bytes, the only one these datasets use


@dataclass(frozen=True)
class Variant:
    """What differs between MNIST and Fashion-MNIST."""

    name: str
    torchvision_class: str  # also the name of torchvision's folder under its root
    classes: tuple[str, ...]
    default_roots: tuple[Path, ...]
    how_to_get: str


MNIST = Variant(
    name="mnist",
    torchvision_class="MNIST",
    classes=tuple(str(d) for d in range(10)),
    default_roots=(Path("data"),),
    how_to_get="get them from https://ossci-datasets.s3.amazonaws.com/mnist/",
)
FASHION_MNIST = Variant(
    name="fashion-mnist",
    torchvision_class="FashionMNIST",
    # Short names without spaces or slashes: they become metric names and folder names.
    classes=("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"),
    default_roots=(Path("/usr/share/datasets/fashion-mnist"), Path("data")),
    how_to_get="install them with 'apt-get install dataset-fashion-mnist' (Debian/Ubuntu)",
)


def load_mnist(
    data_root: Path | None = None,
    download: bool = False,
    normalize: bool = False,
    classes: list[str] | None = None,
    held_out: list[str] | None = None,
) -> DataBundle:
    """MNIST handwritten digits, ``1 x 28 x 28``.

    :param data_root: folder holding the four IDX files (default: ``./data``).
    :param download: fetch missing files with torchvision's downloader (needs a network).
    :param normalize: standardise with the training images' mean and std (the seed did not).
    :param classes: keep only these classes (names or indices), numbered in the order given.
    :param held_out: leave out these classes (names or indices); the others keep their order.
    """
    return load_idx_dataset(MNIST, data_root, download=download, normalize=normalize, classes=classes,
                            held_out=held_out)


def load_fashion_mnist(
    data_root: Path | None = None,
    download: bool = False,
    normalize: bool = False,
    classes: list[str] | None = None,
    held_out: list[str] | None = None,
) -> DataBundle:
    """Fashion-MNIST clothing images, ``1 x 28 x 28``; class names: tshirt, trouser,
    pullover, dress, coat, sandal, shirt, sneaker, bag, ankle-boot.

    :param data_root: folder holding the four IDX files (default: Debian's
        ``/usr/share/datasets/fashion-mnist``, then ``./data``).
    :param download: fetch missing files with torchvision's downloader (needs a network).
    :param normalize: standardise with the training images' mean and std (the seed did not).
    :param classes: keep only these classes (names or indices), numbered in the order given.
    :param held_out: leave out these classes (names or indices); the others keep their order.
    """
    return load_idx_dataset(FASHION_MNIST, data_root, download=download, normalize=normalize, classes=classes,
                            held_out=held_out)


def load_idx_dataset(
    variant: Variant,
    data_root: Path | None,
    *,
    download: bool = False,
    normalize: bool = False,
    classes: Sequence[str] | None = None,
    held_out: Sequence[str] | None = None,
) -> DataBundle:
    """Read ``variant``'s four IDX files into a :class:`DataBundle`."""
    keep = kept_classes(variant.classes, classes, held_out)
    roots = (data_root,) if data_root is not None else variant.default_roots
    paths = find_files(variant, roots)
    if paths is None and download:
        paths = _download(variant, data_root or Path("data"))
    if paths is None:
        raise UsageError(missing_message(variant, roots))
    images = {split: read_idx(paths[f"{split}_images"], ndim=3) for split in ("train", "val")}
    labels = {split: read_idx(paths[f"{split}_labels"], ndim=1) for split in ("train", "val")}
    splits = {}
    for split in ("train", "val"):
        inputs, targets = images[split], labels[split].long()
        if len(inputs) != len(targets):
            raise UsageError(
                f"{variant.name}: {paths[f'{split}_images']} holds {len(inputs)} images but "
                f"{paths[f'{split}_labels']} holds {len(targets)} labels; the files do not belong together"
            )
        if len(targets) and int(targets.max()) >= len(variant.classes):
            raise UsageError(f"{variant.name}: {paths[f'{split}_labels']} has label {int(targets.max())}, "
                             f"expected 0..{len(variant.classes) - 1}")
        if keep is not None:
            inputs, targets = _subset(inputs, targets, keep, len(variant.classes))
        splits[split] = TensorSplit(inputs.unsqueeze(1), targets)
    names = [variant.classes[i] for i in keep] if keep is not None else list(variant.classes)
    mean = std = None
    if normalize:
        pixels = splits["train"].inputs.float().div_(255)
        mean, std = (pixels.mean().item(),), (pixels.std().item(),)
    return DataBundle(train=splits["train"], val=splits["val"], classes=names, input_shape=(1, 28, 28), mean=mean, std=std)


def kept_classes(known: Sequence[str], classes: Sequence[str] | None, held_out: Sequence[str] | None) -> list[int] | None:
    """Indices of the classes a dataset keeps (``None``: all): those of ``classes``,
    or all but those of ``held_out``; ``ValueError`` when both are given or none is left."""
    if classes is not None and held_out is not None:
        raise ValueError("classes and held_out exclude each other; name the classes to keep or to leave out")
    if held_out is None:
        return select_classes(known, classes) if classes is not None else None
    left_out = select_classes(known, held_out, "held_out")
    keep = [index for index in range(len(known)) if index not in left_out]
    if not keep:
        raise ValueError("held_out leaves no class; leave out fewer")
    return keep


def select_classes(known: Sequence[str], wanted: Sequence[str], option: str = "classes") -> list[int]:
    """Indices of the ``wanted`` classes, given by name or index; ``ValueError`` when unknown."""
    if not wanted:
        raise ValueError(f"{option} must name at least one class")
    indices = []
    for item in wanted:
        text = str(item).strip()
        if text in known:
            index = known.index(text)
        elif text.isdigit() and int(text) < len(known):
            index = int(text)
        else:
            raise ValueError(f"unknown class {text!r} in {option}; the classes are: {', '.join(known)} (or 0..{len(known) - 1})")
        if index in indices:
            raise ValueError(f"class {known[index]!r} is listed twice in {option}")
        indices.append(index)
    return indices


def _subset(
    inputs: torch.Tensor, targets: torch.Tensor, keep: list[int], num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples of the ``keep`` classes, relabelled ``0..len(keep)-1`` in that order."""
    relabel = torch.full((num_classes,), -1, dtype=torch.long)
    relabel[torch.tensor(keep)] = torch.arange(len(keep))
    new = relabel[targets]
    chosen = new >= 0
    return inputs[chosen], new[chosen]


def find_files(variant: Variant, roots: Sequence[Path]) -> dict[str, Path] | None:
    """The four files in the first folder that holds all of them, each as ``.gz`` or plain."""
    for root in roots:
        for folder in (root, root / variant.torchvision_class / "raw"):
            found = {}
            for key, stem in FILES.items():
                for candidate in (folder / stem, folder / f"{stem}.gz"):
                    if candidate.is_file():
                        found[key] = candidate
                        break
            if len(found) == len(FILES):
                return found
    return None


def missing_message(variant: Variant, roots: Sequence[Path]) -> str:
    where = " or ".join(str(r) for r in roots)
    return (f"{variant.name} data not found: expected {', '.join(FILES.values())} (each may end in .gz) "
            f"in {where} (or its {variant.torchvision_class}/raw/); {variant.how_to_get} "
            f"or run again with -o dataset.download=true, or point --data-root at the folder that holds them")


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """Read an IDX file of unsigned bytes with ``ndim`` dimensions (gzip or plain)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise UsageError(f"{path} cannot be read: {exc}; the file is damaged or incomplete, get it again") from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[0] != 0 or raw[1] != 0:
        raise UsageError(f"{path} is not an IDX file (bad header); get the original file again")
    if raw[2] != UBYTE or raw[3] != ndim:
        raise UsageError(f"{path} holds {raw[3]}-dimensional data of IDX type 0x{raw[2]:02x}, "
                         f"expected {ndim}-dimensional unsigned bytes (type 0x08); is it the right file?")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise UsageError(f"{path} is truncated or damaged: its header promises {'x'.join(map(str, dims))} bytes of data "
                         f"({expected} in all) but it holds {len(raw)}; get the file again")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy())


def _download(variant: Variant, root: Path) -> dict[str, Path]:
    """Fetch the files with torchvision's downloader into ``root/<Class>/raw/``."""
    torchvision_download(variant.torchvision_class, root, variant.name,
                         f"{variant.how_to_get}, or copy the four IDX files there by hand")
    found = find_files(variant, (root,))
    if found is None:
        raise UsageError(f"{variant.name}: the download finished but {missing_message(variant, (root,))}")
    return found
