"""scikit-learn's bundled tables: diabetes (regression) and Wisconsin breast
cancer (binary classification), real data, offline."""

from __future__ import annotations

import numpy as np
import torch

from trainer_core import DataBundle, TensorSplit


def _check_fraction(val_fraction: float) -> None:
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (got {val_fraction})")


def feature_stats(x_train: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-feature mean and (population) standard deviation of the training rows;
    a constant feature gets a standard deviation of 1, so normalising never divides by zero."""
    std = x_train.std(axis=0)
    std[std == 0] = 1.0
    return tuple(float(m) for m in x_train.mean(axis=0)), tuple(float(s) for s in std)


def diabetes_split(
    val_fraction: float = 0.2, split_seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_val, y_val)`` of the diabetes data as float64 arrays:
    the split :func:`load_diabetes` uses, for baselines measured on the same rows.

    :param val_fraction: share of patients held out for validation.
    :param split_seed: seed of the random split.
    """
    from sklearn.datasets import load_diabetes as sklearn_diabetes
    from sklearn.model_selection import train_test_split

    _check_fraction(val_fraction)
    data = sklearn_diabetes(scaled=False)  # raw units (age in years, ...): we normalise with the training split
    x_train, x_val, y_train, y_val = train_test_split(
        data.data, data.target, test_size=val_fraction, random_state=split_seed
    )
    return x_train, y_train, x_val, y_val


def _bundle(x_train: np.ndarray, y_train: torch.Tensor, x_val: np.ndarray, y_val: torch.Tensor,
            classes: list[str], task: str) -> DataBundle:
    mean, std = feature_stats(x_train)
    return DataBundle(
        train=TensorSplit(torch.from_numpy(x_train).float(), y_train),
        val=TensorSplit(torch.from_numpy(x_val).float(), y_val),
        classes=classes,
        input_shape=(x_train.shape[1],),
        mean=mean,
        std=std,
        task=task,
    )


def load_diabetes(val_fraction: float = 0.2, split_seed: int = 0) -> DataBundle:
    """Diabetes progression: 442 patients, 10 baseline measurements each (age,
    sex, BMI, blood pressure, six blood serum values), and one float target, a
    measure of disease progression one year after baseline.  A regression task,
    normalised per feature with the training split's statistics.

    :param val_fraction: share of patients held out for validation.
    :param split_seed: seed of the random split; fixed so every run validates on the same patients.
    """
    x_train, y_train, x_val, y_val = diabetes_split(val_fraction, split_seed)
    return _bundle(x_train, torch.from_numpy(y_train).float(), x_val, torch.from_numpy(y_val).float(),
                   ["progression"], "regression")


def load_breast_cancer(val_fraction: float = 0.2, split_seed: int = 0) -> DataBundle:
    """Wisconsin breast cancer: 569 tumours, 30 features computed from a
    digitised image of a fine-needle aspirate, each malignant or benign.  A
    binary classification task with a stratified split, normalised per feature
    with the training split's statistics.

    :param val_fraction: share of tumours held out for validation.
    :param split_seed: seed of the stratified split; fixed so every run validates on the same tumours.
    """
    from sklearn.datasets import load_breast_cancer as sklearn_breast_cancer
    from sklearn.model_selection import train_test_split

    _check_fraction(val_fraction)
    data = sklearn_breast_cancer()
    x_train, x_val, y_train, y_val = train_test_split(
        data.data, data.target, test_size=val_fraction, random_state=split_seed, stratify=data.target
    )
    return _bundle(x_train, torch.from_numpy(y_train).long(), x_val, torch.from_numpy(y_val).long(),
                   [str(name) for name in data.target_names], "classification")
