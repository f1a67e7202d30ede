"""torchvision's classification models by name (``resnet18``, ``mobilenet_v3_small``,
``efficientnet_b0``, ...), with the classifier head sized to the dataset's classes.

``weights=imagenet`` loads torchvision's pretrained ImageNet weights from the
local torch hub cache only (``$TORCH_HOME/hub/checkpoints``): a run never
downloads.  Every layer but the head is loaded; the head starts fresh.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from trainer_core_plugins.models.weights import load_into
from trainer_core import Normalization, UsageError, did_you_mean, loaded_weights


def build(input_shape: tuple[int, ...], num_classes: int, arch: str, weights: str | None = None,
          strict: bool = True) -> nn.Module:
    """Any torchvision classification model, e.g. ``-o model.arch=mobilenet_v3_small``.

    :param arch: the model's name in ``torchvision.models`` (as ``torchvision.models.list_models()`` gives it).
    :param weights: ``imagenet`` (torchvision's pretrained weights, from the
        local torch hub cache), or a state dict, checkpoint or run folder; layers
        of another shape (the head) start fresh.
    :param strict: with ``weights``, any tensor outside the head that does not fit is an
        error; ``false`` lets such layers start fresh instead (with a warning).
    """
    import torchvision.models

    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        raise ValueError(f"unknown torchvision model '{arch}'{did_you_mean(arch, known)}; "
                         f"classification models: {', '.join(known)}")
    if len(input_shape) != 3:
        raise ValueError(f"{arch} needs images (channels x height x width), got input shape {tuple(input_shape)}")
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if weights == "imagenet":  # RGB weights: loaded before the first layer is adapted to the channels
        path = imagenet_file(arch)
        load_into(model, torch.load(path, map_location="cpu", weights_only=True), origin=str(path), strict=strict)
        record = loaded_weights(model)
        if record is not None:  # what torchvision's own transforms for these weights normalise with
            expected = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
            record.normalization = Normalization(tuple(expected.mean), tuple(expected.std))
    if input_shape[0] != 3:
        adapt_input_channels(model, input_shape[0])
    if weights is not None and weights != "imagenet":  # saved from a model already adapted like this one
        load_into(model, weights, strict=strict)
    return model


def build_resnet18(input_shape: tuple[int, ...], num_classes: int, weights: str | None = None,
                   strict: bool = True) -> nn.Module:
    """ResNet-18 (the seed's transfer-learning model); the head is ``fc``.

    :param weights: ``imagenet`` (from the local torch hub cache), or a state
        dict, checkpoint or run folder; layers of another shape (the head) start fresh.
    :param strict: with ``weights``, any tensor outside the head that does not fit is an
        error; ``false`` lets such layers start fresh instead (with a warning).
    """
    return build(input_shape, num_classes, arch="resnet18", weights=weights, strict=strict)


def imagenet_file(arch: str) -> Path:
    """The cached file of ``arch``'s default ImageNet weights; an error naming it when absent."""
    import torchvision.models

    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / url.rsplit("/", 1)[-1]
    if not path.is_file():
        raise UsageError(
            f"ImageNet weights for {arch} not found: expected {path.name} in {folder} (runs never download); "
            f"fetch it from {url} into that folder (or set TORCH_HOME to where it is)"
        )
    return path


def adapt_input_channels(model: nn.Module, channels: int) -> None:
    """Give the first convolution ``channels`` inputs, keeping what it learned:
    each new input channel gets the mean of the RGB filters, scaled so the
    response to a grey image stays the same (for one channel: their sum)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                new = nn.Conv2d(channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                                child.dilation, child.groups, child.bias is not None, child.padding_mode)
                with torch.no_grad():
                    new.weight.copy_(child.weight.mean(1, keepdim=True).repeat(1, channels, 1, 1) * 3 / channels)
                    if child.bias is not None:
                        new.bias.copy_(child.bias)
                setattr(parent, name, new)
                return
    raise ValueError(f"cannot adapt {type(model).__name__} to {channels}-channel images: no 3-channel convolution found")
