"""The seed's CIFAR-10 network (LeNet-style), sized to the dataset."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer_core_plugins.models.weights import load_local

MIN_SIDE = 16  # two 5x5 convolutions and two 2x2 poolings leave at least 1x1


class ConvNet(nn.Module):
    """conv 5x5 -> ReLU -> max-pool 2 -> conv 5x5 -> ReLU -> max-pool 2 -> three
    fully connected layers; ``fc3`` is the classifier head.  Layer names are the
    seed's, so its saved state dicts load as they are."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden1: int = 220, hidden2: int = 184) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.conv1 = nn.Conv2d(channels, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.flat_features = 16 * _side_after(height) * _side_after(width)  # 400 for 32x32, as in the seed
        self.fc1 = nn.Linear(self.flat_features, hidden1)
        self.fc2 = nn.Linear(hidden1, hidden2)
        self.fc3 = nn.Linear(hidden2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def _side_after(side: int) -> int:
    return ((side - 4) // 2 - 4) // 2


def build(
    input_shape: tuple[int, ...], num_classes: int, hidden1: int = 220, hidden2: int = 184, weights: str | None = None,
    strict: bool = True,
) -> nn.Module:
    """:param hidden1: width of the first fully connected layer (the seed chose 220).
    :param hidden2: width of the second (the seed chose 184).
    :param weights: a state dict, checkpoint or run folder to start from; layers
        of another shape (a head for another class count) start fresh.
    :param strict: with ``weights``, any tensor outside the head that does not fit is an
        error; ``false`` lets such layers start fresh instead (with a warning)."""
    if len(input_shape) != 3:
        raise ValueError(f"convnet needs images (channels x height x width), got input shape {tuple(input_shape)}")
    if min(input_shape[1:]) < MIN_SIDE:
        raise ValueError(f"convnet needs images of at least {MIN_SIDE}x{MIN_SIDE} pixels (got "
                         f"{input_shape[1]}x{input_shape[2]}); use a model for small images such as smallcnn")
    for name, value in (("hidden1", hidden1), ("hidden2", hidden2)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1 (got {value})")
    model = ConvNet(tuple(input_shape), num_classes, hidden1, hidden2)
    if weights is not None:
        load_local(model, "convnet", weights, strict)
    return model
