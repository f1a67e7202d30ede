"""scikit-learn's bundled 8x8 handwritten digits: 1,797 real images, offline."""

from __future__ import annotations

import torch

from trainer_core import DataBundle, TensorSplit


def load(val_fraction: float = 0.2, split_seed: int = 0) -> DataBundle:
    """Digits 0-9 as ``1 x 8 x 8`` images, with a fixed stratified train/validation split.

    :param val_fraction: share of images held out for validation.
    :param split_seed: seed of the split; fixed so every run validates on the same images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (got {val_fraction})")
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)  # pixel values are 0..16
    targets = torch.from_numpy(digits.target).long()
    train_idx, val_idx = train_test_split(
        range(len(targets)), test_size=val_fraction, random_state=split_seed, stratify=digits.target
    )
    train, val = torch.tensor(train_idx), torch.tensor(val_idx)
    mean, std = images[train].mean().item(), images[train].std().item()
    return DataBundle(
        train=TensorSplit(images[train], targets[train]),
        val=TensorSplit(images[val], targets[val]),
        classes=[str(d) for d in range(10)],
        input_shape=(1, 8, 8),
        mean=(mean,),
        std=(std,),
    )
