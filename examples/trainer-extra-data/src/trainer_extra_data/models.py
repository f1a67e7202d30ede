"""``logreg``: multinomial logistic regression, the baseline every image model should beat."""

from __future__ import annotations

from math import prod

from torch import nn


def logreg(input_shape: tuple[int, ...], num_classes: int, dropout: float = 0.0) -> nn.Module:
    """Flatten the input, then one linear layer to the class logits.

    :param dropout: dropout on the flattened input (0 for none).
    """
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1) (got {dropout})")
    return nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(prod(input_shape), num_classes))
