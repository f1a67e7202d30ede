"""Images in class folders: ``train/<class>/*`` and ``val/<class>/*`` (the seed's
hymenoptera layout), read from disk as they are needed.

Unlike the small in-memory datasets these stream through a ``DataLoader``
(with workers when the run asks for them).  Samples leave the workers as uint8
tensors; scaling and normalisation happen on whole batches on the training
device.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from trainer_core import DataBundle, UsageError

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load(
    data_root: Path | None = None,
    image_size: int = 224,
    resize: int | None = None,
    augment: bool = True,
    channels: Literal[1, 3] = 3,
    normalization: Literal["imagenet", "none"] = "imagenet",
    cache: bool = False,
) -> DataBundle:
    """An image classification dataset from ``train/`` and ``val/`` class folders.

    With the defaults, the seed's transforms: training images get a random
    resized 224 crop and a random horizontal flip; validation images are
    resized to 256 and centre-cropped to 224; both are normalised with the
    ImageNet mean and std.

    :param data_root: the folder holding ``train/`` and ``val/``.
    :param image_size: side of the square crop the model sees.
    :param resize: validation images' shorter side before the centre crop
        (default: ``image_size * 8 / 7``, the seed's 256 for 224); set it to
        ``image_size`` to keep the whole image.
    :param augment: random resized crop and flip for training images;
        ``false`` treats them like validation images.
    :param channels: 3 (RGB) or 1 (grayscale).
    :param normalization: ``imagenet`` (mean/std of ImageNet, for pretrained
        models) or ``none`` (pixels scaled to 0..1 only).
    :param cache: decode every image once and hold the folder in memory as
        uint8 tensors (refused when that needs more than half the free memory);
        training crops and flips then run on whole batches on the device
        (:mod:`trainer_core_plugins.datasets.folder_cache`).
    """
    from torchvision import transforms

    if data_root is None:
        raise ValueError("needs --data-root: a folder holding train/<class>/ and val/<class>/ image folders")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1 (got {image_size})")
    if resize is not None and resize < image_size:
        raise ValueError(f"resize must be >= image_size ({image_size}) (got {resize})")
    resize = resize if resize is not None else round(image_size * 8 / 7)
    colour = [transforms.Grayscale(1)] if channels == 1 else []
    evaluation = transforms.Compose([*colour, transforms.Resize(resize), transforms.CenterCrop(image_size),
                                     transforms.PILToTensor()])
    training = transforms.Compose([*colour, transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                                   transforms.PILToTensor()]) if augment else evaluation
    train = _folder(data_root / "train", training)
    val = _folder(data_root / "val", evaluation)
    if val.classes != train.classes:
        raise UsageError(f"{data_root / 'val'} has classes {', '.join(val.classes)} but {data_root / 'train'} has "
                         f"{', '.join(train.classes)}; both need the same class folders")
    classes = list(train.classes)
    if cache:
        from trainer_core_plugins.datasets.folder_cache import cache as decode_once

        train, val = decode_once(train, val, image_size=image_size, resize=resize,  # type: ignore[assignment]
                                 augment=augment, colour=colour)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if normalization == "imagenet" else (None, None)
    if mean is not None and channels == 1:
        # A grayscale pixel is the luma of the RGB one, so its mean and std are roughly their average.
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    return DataBundle(train=train, val=val, classes=classes, input_shape=(channels, image_size, image_size),
                      mean=mean, std=std)


def _folder(path: Path, transform: Callable[[Any], Any]) -> ImageFolder:
    """A torchvision ``ImageFolder``; a missing or empty folder is a usage error naming it."""
    from torchvision.datasets import ImageFolder

    if not path.is_dir():
        raise UsageError(f"image folder {path} does not exist: --data-root must hold train/<class>/ and val/<class>/ "
                         f"folders of images (e.g. the seed's hymenoptera_data)")
    try:
        images = ImageFolder(str(path), transform=transform, loader=read_image)
    except FileNotFoundError as exc:  # no class folders, or a class folder without images
        raise UsageError(f"image folder {path}: {exc}") from None
    _check_headers(images.samples)
    return images


def _check_headers(samples: list[tuple[str, int]]) -> None:
    """Read every image's header (no pixels are decoded): a file PIL cannot identify,
    or a decompression bomb, is refused now, before the run folder is made, rather
    than part-way through the run.  Damage further into a file is found when it is read."""
    from PIL import Image

    for file, _ in samples:
        try:
            with Image.open(file):
                pass
        except Image.DecompressionBombError as exc:
            raise UsageError(f"cannot read {file} ({ImageTooLarge.__name__}: {exc}); replace or remove it") from None
        except OSError as exc:  # PIL's UnidentifiedImageError, an unreadable file
            detail = type(exc).__name__ if file in str(exc) else f"{type(exc).__name__}: {exc}"
            raise UsageError(f"cannot read {file} ({detail}); replace or remove it") from None


class ImageTooLarge(OSError):
    """An image whose header declares more pixels than PIL agrees to decode (a
    decompression bomb): unreadable, like a damaged image file."""


def read_image(path: str) -> Any:
    """torchvision's image loader, except that PIL's ``DecompressionBombError``
    (not an ``OSError``) comes out as :class:`ImageTooLarge`, an ``OSError`` like
    every other unreadable image, so the loop names the file in one line."""
    from PIL import Image
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc)) from None
