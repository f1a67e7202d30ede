"""Synthetic, learnable multi-label data for tests and smoke runs (no real
multi-label set ships offline): no files, no downloads."""

from __future__ import annotations

import math

import torch

from trainer_core import DataBundle, TensorSplit

# Label frequencies run evenly from the first to the last label, so some labels are rare.
MOST_FREQUENT, LEAST_FREQUENT = 0.6, 0.15


def load(
    num_labels: int = 5,
    features: int = 16,
    train_size: int = 512,
    val_size: int = 256,
    noise: float = 0.5,
    seed: int = 0,
) -> DataBundle:
    """Standard normal feature vectors; label ``l`` is on when ``w_l . x + noise * e``
    exceeds a threshold, with a fixed random unit vector ``w_l`` per label and
    thresholds set so label frequencies run from about 60 % (``label0``) down to
    about 15 % (the last label).  A sample can carry several labels, or none.

    :param num_labels: labels per sample (model outputs).
    :param features: length of each feature vector.
    :param noise: standard deviation of the noise added to each label's score;
        0 makes the labels a linear function of the features.
    :param seed: seed of the directions, features and noise (independent of the run's seed).
    """
    for name, value in (("num_labels", num_labels), ("features", features),
                        ("train_size", train_size), ("val_size", val_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1 (got {value})")
    if noise < 0:
        raise ValueError(f"noise must be >= 0 (got {noise})")
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(num_labels, features, generator=generator)
    directions /= directions.norm(dim=1, keepdim=True)  # so each score is N(0, 1 + noise^2)
    frequencies = torch.linspace(MOST_FREQUENT, LEAST_FREQUENT, num_labels)
    thresholds = math.sqrt(1 + noise**2) * torch.special.ndtri(1 - frequencies)

    def split(size: int) -> TensorSplit:
        inputs = torch.randn(size, features, generator=generator)
        scores = inputs @ directions.T + noise * torch.randn(size, num_labels, generator=generator)
        return TensorSplit(inputs, (scores > thresholds).float())

    return DataBundle(
        train=split(train_size),
        val=split(val_size),
        classes=[f"label{i}" for i in range(num_labels)],
        input_shape=(features,),
        task="multilabel",
    )
