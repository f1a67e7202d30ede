"""torchvision's ``RandomResizedCrop`` + ``RandomHorizontalFlip``, for a whole
batch of uint8 images at once, on the device that holds them.

The crop boxes are drawn as torchvision draws them (area 8-100 % of the
*original* image, aspect ratio 3/4-4/3, ten tries, then a centre crop), in
that image's own pixel grid, and then expressed as fractions of the image: so
a cached copy stored at another size (even squashed to a square) is cropped at
the same place.  One ``grid_sample`` then crops, resizes and mirrors the batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
TRIES = 10


class RandomResizedCropFlip:
    """Batch-level random resized crop to ``size`` x ``size`` and horizontal flip (p = 0.5).

    :param size: side of the square output.
    :param image_sizes: ``N x 2`` (height, width) of each sample's original
        image, in the order of the split it augments.
    """

    def __init__(self, size: int, image_sizes: torch.Tensor) -> None:
        self.size = size
        self.image_sizes = image_sizes.float()

    def __call__(self, images: torch.Tensor, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``images`` (``n x C x H x W`` uint8, the samples ``index`` of the split),
        cropped, resized and flipped: ``n x C x size x size`` uint8."""
        if self.image_sizes.device != images.device:
            self.image_sizes = self.image_sizes.to(images.device)
        height, width = self.image_sizes[index].unbind(1)
        top, left, h, w = crop_boxes(height, width, generator)
        flip = torch.rand(len(images), generator=generator, device=images.device) < 0.5
        return resized_crops(images, (top / height, left / width, h / height, w / width), flip, self.size)


def resized_crops(images: torch.Tensor, boxes: tuple[torch.Tensor, ...], flip: torch.Tensor, size: int) -> torch.Tensor:
    """Each of ``images`` (uint8) cropped to its box (``top, left, height, width``
    as fractions of the image), resized to ``size`` x ``size`` (bilinear) and
    mirrored where ``flip``: uint8, as PIL's resize gives."""
    top, left, h, w = boxes
    # An output point x in [-1, 1] (align_corners=False: pixel edges) reads the input at
    # centre + half-width * x, in the same normalised units; a flip reverses x.
    theta = torch.zeros(len(images), 2, 3, device=images.device)
    theta[:, 0, 0] = torch.where(flip, -w, w)
    theta[:, 0, 2] = 2 * left + w - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * top + h - 1
    grid = F.affine_grid(theta, [len(images), images.shape[1], size, size], align_corners=False)
    # "border": PIL's resampling renormalises its weights at an image's edge, which amounts to the same.
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def crop_boxes(height: torch.Tensor, width: torch.Tensor,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(top, left, h, w)`` of one random crop per image of ``height`` x ``width``
    pixels, drawn as ``torchvision.transforms.RandomResizedCrop.get_params`` draws them."""
    n, device = len(height), height.device
    draws = torch.rand(n, TRIES, 4, generator=generator, device=device)
    area = (height * width)[:, None] * (SCALE[0] + (SCALE[1] - SCALE[0]) * draws[..., 0])
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * draws[..., 1])
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    fits = (w >= 1) & (w <= width[:, None]) & (h >= 1) & (h <= height[:, None])
    first = fits.int().argmax(1, keepdim=True)  # the first try that fits (0 when none does)
    pick = lambda values: values.gather(1, first).squeeze(1)  # noqa: E731
    w, h = pick(w), pick(h)
    top = (pick(draws[..., 2]) * (height - h + 1)).floor()
    left = (pick(draws[..., 3]) * (width - w + 1)).floor()
    # No try fits: the centre crop of the largest box within the ratio range.
    ratio = width / height
    fall_w = torch.where(ratio > RATIO[1], (height * RATIO[1]).round(), width)
    fall_h = torch.where(ratio < RATIO[0], (width / RATIO[0]).round(), height)
    none_fit = ~fits.any(1)
    w, h = torch.where(none_fit, fall_w, w), torch.where(none_fit, fall_h, h)
    top = torch.where(none_fit, ((height - h) / 2).floor(), top)
    left = torch.where(none_fit, ((width - w) / 2).floor(), left)
    return top, left, h, w
