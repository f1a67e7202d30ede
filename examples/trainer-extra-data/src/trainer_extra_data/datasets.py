"""``npz``: images and labels from a NumPy ``.npz`` file (the layout of Keras' ``mnist.npz``)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from trainer_core import DataBundle, TensorSplit

EXPECTED = "arrays x_train, y_train and optionally x_test, y_test (or x_val, y_val) and class_names"


def npz(
    data_root: Path | None = None,
    file: str = "data.npz",
    channels_last: bool = True,
    val_fraction: float = 0.2,
    split_seed: int = 0,
) -> DataBundle:
    """Images ``x_*`` (``N x H x W``, or ``N x H x W x C`` / ``N x C x H x W``) and labels ``y_*``.

    The validation split is ``x_val``/``x_test`` when the file has one, else a
    seeded ``val_fraction`` of the training arrays.  ``uint8`` images stay
    ``uint8`` in memory (scaled per batch); the per-channel mean and std of
    the training split normalise every batch.

    :param file: the file name in ``--data-root`` (or a path).
    :param channels_last: 4-dimensional arrays are ``N x H x W x C`` (NumPy's
        usual layout); ``false`` for ``N x C x H x W``.
    :param val_fraction: share of the training arrays held out when the file has no validation arrays.
    :param split_seed: seed of that split.
    """
    path = Path(file) if data_root is None else Path(data_root) / file
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (got {val_fraction})")
    try:
        with np.load(path, allow_pickle=False) as arrays:  # no pickles: loading data never runs code
            found = {name: arrays[name] for name in arrays.files}
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist; give --data-root FOLDER holding {file} with {EXPECTED}") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path} is not a readable .npz file: {exc}") from None
    if "x_train" not in found or "y_train" not in found:
        raise ValueError(f"{path} holds {', '.join(sorted(found)) or 'nothing'}; expected {EXPECTED}")
    train = _split(found["x_train"], found["y_train"], channels_last, f"{path}: x_train")
    val_name = next((n for n in ("val", "test") if f"x_{n}" in found and f"y_{n}" in found), None)
    if val_name is not None:
        val = _split(found[f"x_{val_name}"], found[f"y_{val_name}"], channels_last, f"{path}: x_{val_name}")
    else:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(split_seed))
        held = max(1, int(len(train) * val_fraction))
        val = TensorSplit(train.inputs[order[:held]], train.targets[order[:held]])
        train = TensorSplit(train.inputs[order[held:]], train.targets[order[held:]])
    for role, split in (("training", train), ("validation", val)):
        if len(split) == 0:
            raise ValueError(f"{path}: the {role} split is empty; the file needs images in it (or a larger x_train to hold out from)")
    count = int(max(train.targets.max(), val.targets.max())) + 1
    names = [str(n) for n in found["class_names"]] if "class_names" in found else [str(i) for i in range(count)]
    if len(names) < count:
        raise ValueError(f"{path}: labels go up to {count - 1} but class_names has {len(names)} names")
    scaled = train.inputs.float() / (255 if train.inputs.dtype == torch.uint8 else 1)
    return DataBundle(
        train=train,
        val=val,
        classes=names,
        input_shape=tuple(train.inputs.shape[1:]),
        mean=tuple(scaled.mean(dim=(0, 2, 3)).tolist()),
        std=tuple(scaled.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()),
    )


def _split(x: np.ndarray, y: np.ndarray, channels_last: bool, where: str) -> TensorSplit:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and channels_last:
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4:
        raise ValueError(f"{where} has shape {x.shape}; expected N x H x W or N x H x W x C images")
    if len(x) != len(y) or y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
        raise ValueError(f"{where}: labels must be {len(x)} non-negative integers (got shape {y.shape}, {y.dtype})")
    inputs = torch.from_numpy(np.ascontiguousarray(x))
    inputs = inputs if inputs.dtype == torch.uint8 else inputs.float()
    return TensorSplit(inputs, torch.from_numpy(y.astype(np.int64)))
