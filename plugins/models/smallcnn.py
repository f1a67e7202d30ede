"""A small CNN for small images: the default model (reaches 97-99 % on digits)."""

from __future__ import annotations

from torch import nn

from trainer_core_plugins.models.weights import load_local


class SmallCNN(nn.Module):
    """Two 3x3 convolutions, pooling to 4x4, and a two-layer classifier head (``classifier``)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.25) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveMaxPool2d(4),  # any input size above 4x4 works
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(2 * width * 16, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.classifier(self.features(x))


def build(
    input_shape: tuple[int, ...], num_classes: int, width: int = 32, dropout: float = 0.25, weights: str | None = None,
    strict: bool = True,
) -> nn.Module:
    """:param width: channels of the first convolution (the second has twice as many).
    :param dropout: dropout before the classifier's first layer.
    :param weights: a state dict, checkpoint or run folder to start from; layers
        of another shape (a head for another class count) start fresh.
    :param strict: with ``weights``, any tensor outside the head that does not fit is an
        error; ``false`` lets such layers start fresh instead (with a warning)."""
    if len(input_shape) != 3:
        raise ValueError(f"smallcnn needs images (channels x height x width), got input shape {tuple(input_shape)}; "
                         "use a model for such inputs, e.g. --model mlp")
    if width < 1:
        raise ValueError(f"width must be >= 1 (got {width})")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1) (got {dropout})")
    model = SmallCNN(input_shape[0], num_classes, width=width, dropout=dropout)
    if weights is not None:
        load_local(model, "smallcnn", weights, strict)
    return model
