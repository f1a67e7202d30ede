"""Synthetic, learnable images for tests and smoke runs: no files, no downloads."""

from __future__ import annotations

import torch

from trainer_core import DataBundle, TensorSplit


def load(
    num_classes: int = 3,
    train_size: int = 96,
    val_size: int = 48,
    channels: int = 1,
    image_size: int = 8,
    noise: float = 0.5,
    seed: int = 0,
) -> DataBundle:
    """Each class is a fixed random pattern plus Gaussian noise, so a model can learn it.

    :param noise: standard deviation of the noise around each class's pattern.
    :param seed: seed of the patterns and noise (independent of the run's seed).
    """
    for name, value in (("num_classes", num_classes), ("train_size", train_size), ("val_size", val_size),
                        ("channels", channels), ("image_size", image_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1 (got {value})")
    generator = torch.Generator().manual_seed(seed)
    shape = (channels, image_size, image_size)
    patterns = torch.randn(num_classes, *shape, generator=generator)

    def split(size: int) -> TensorSplit:
        targets = torch.arange(size) % num_classes
        inputs = patterns[targets] + noise * torch.randn(size, *shape, generator=generator)
        return TensorSplit(inputs, targets)

    return DataBundle(
        train=split(train_size),
        val=split(val_size),
        classes=[f"class{i}" for i in range(num_classes)],
        input_shape=shape,
    )
