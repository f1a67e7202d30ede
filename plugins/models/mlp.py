"""The seed's MNIST network: flatten -> hidden layer -> ReLU -> classes."""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer_core_plugins.models.weights import load_local


class MLP(nn.Module):
    """One hidden layer; ``l2`` is the classifier head.  Layer names are the
    seed's (``l1``, ``relu``, ``l2``), so its saved state dicts load as they are."""

    def __init__(self, input_size: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.l1 = nn.Linear(input_size, hidden)
        self.relu = nn.ReLU()
        self.l2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(self.relu(self.l1(x.flatten(1))))


def build(input_shape: tuple[int, ...], num_classes: int, hidden: int = 100, weights: str | None = None,
          strict: bool = True) -> nn.Module:
    """:param hidden: width of the hidden layer (the seed chose 100).
    :param weights: a state dict, checkpoint or run folder to start from; layers
        of another shape (a head for another class count) start fresh.
    :param strict: with ``weights``, any tensor outside the head that does not fit is an
        error; ``false`` lets such layers start fresh instead (with a warning)."""
    if hidden < 1:
        raise ValueError(f"hidden must be >= 1 (got {hidden})")
    model = MLP(math.prod(input_shape), hidden, num_classes)
    if weights is not None:
        load_local(model, "mlp", weights, strict)
    return model
