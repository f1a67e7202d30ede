"""imagefolder's ``cache=true``: every image decoded once, held as uint8 tensors.

Deterministic transforms (validation's resize and centre crop, or training
without ``augment``) are applied once and kept: the cached images are exactly
those the folder's transforms give.  Random ones cannot be kept, so a training
image is kept whole, resized to a square of at most ``resize`` pixels a side,
and the random resized crop and flip run on each batch, on the device
(:mod:`trainer_core_plugins.datasets.batch_crops`), at the place torchvision would crop the original.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from trainer_core import TensorSplit, UsageError

from trainer_core_plugins.datasets.batch_crops import RandomResizedCropFlip

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder

#: The share of the memory free when the run starts that a cache may take.
MEMORY_SHARE = 0.5


def free_memory() -> int:
    """Bytes of memory available to a new allocation without swapping (Linux's
    ``MemAvailable``; elsewhere the free physical pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(splits: list[tuple[int, int, int]], available: int | None = None) -> None:
    """Refuse, in one line, a cache of ``(images, channels, pixels)`` splits larger
    than :data:`MEMORY_SHARE` of the ``available`` memory (default: :func:`free_memory`)."""
    need = sum(n * channels * pixels for n, channels, pixels in splits)
    available = free_memory() if available is None else available
    if need > MEMORY_SHARE * available:
        raise UsageError(f"dataset.cache: the decoded images need {need / 2**20:,.0f} MiB, more than half of the "
                         f"{available / 2**20:,.0f} MiB of memory free; read them from disk each epoch "
                         "(dataset.cache=false) or lower dataset.image_size")


def image_sizes(images: ImageFolder) -> torch.Tensor:
    """``N x 2`` (height, width) of every image, from its header (nothing decoded)."""
    from PIL import Image

    sizes = []
    for file, _ in images.samples:
        try:
            with Image.open(file) as image:
                sizes.append(image.size[::-1])
        except (OSError, Image.DecompressionBombError) as exc:
            raise unreadable(file, exc) from None
    return torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2)


def decoded(images: ImageFolder, transform: Callable[[Any], torch.Tensor], shape: tuple[int, int, int]) -> torch.Tensor:
    """Every image of ``images`` through ``transform`` (whose uint8 output is
    ``shape``), in one preallocated ``N x C x H x W`` tensor."""
    out = torch.empty(len(images.samples), *shape, dtype=torch.uint8)
    for i, (file, _) in enumerate(images.samples):
        try:
            out[i] = transform(images.loader(file))
        except OSError as exc:  # damage past the header: found on decoding
            raise unreadable(file, exc) from None
    return out


def unreadable(file: str, exc: BaseException) -> UsageError:
    """The loop's one-line error for an image that cannot be read."""
    name = "ImageTooLarge" if "DecompressionBomb" in type(exc).__name__ else type(exc).__name__
    detail = name if file in str(exc) else f"{name}: {exc}"
    return UsageError(f"cannot read {file} ({detail}); replace or remove it")


def cache(train: ImageFolder, val: ImageFolder, *, image_size: int, resize: int, augment: bool,
          colour: list[Any]) -> tuple[TensorSplit, TensorSplit]:
    """The two splits of an image folder decoded into memory (see the module's docstring).

    :param train: the training folder, its ``transform`` the run's.
    :param val: the validation folder, its ``transform`` the run's.
    :param image_size: side of the square the model sees.
    :param resize: the most pixels a side a training image keeps (with ``augment``).
    :param augment: whether training images get a random resized crop and flip.
    :param colour: the transforms that set the channels (``[]`` or ``[Grayscale(1)]``).
    """
    from torchvision import transforms

    channels = 1 if colour else 3
    if augment:
        sizes = image_sizes(train)
        # The largest source side, at most `resize`: small images are kept as they are.
        side = int(min(resize, sizes.max().item() if len(sizes) else resize))
        plan = [(len(train.samples), channels, side * side), (len(val.samples), channels, image_size * image_size)]
        check_fits(plan)
        whole = transforms.Compose([*colour, transforms.Resize((side, side)), transforms.PILToTensor()])
        train_split = TensorSplit(decoded(train, whole, (channels, side, side)), torch.tensor(train.targets),
                                  augment=RandomResizedCropFlip(image_size, sizes))
    else:
        check_fits([(len(train.samples) + len(val.samples), channels, image_size * image_size)])
        train_split = TensorSplit(decoded(train, train.transform, (channels, image_size, image_size)),
                                  torch.tensor(train.targets))
    val_split = TensorSplit(decoded(val, val.transform, (channels, image_size, image_size)), torch.tensor(val.targets))
    return train_split, val_split
