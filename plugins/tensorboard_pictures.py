"""Pictures the tensorboard plugin logs, drawn to be read by a person: the
confusion matrix with its class names and axis titles, and which validation
images the image grid shows."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch
    from PIL import Image, ImageFont
    from torch.utils.data import Dataset

    from trainer_core import TensorSplit

    Split = TensorSplit | Dataset  # (a split of a DataBundle)

LABEL_CHARS = 12  # class names are cut to this many characters
FONT_SIZE = 13  # pixels: Pillow's scalable default font at this size reads well at the picture's own size
SMALL_FONT_SIZE = 10  # for a count too wide for its cell at FONT_SIZE (a big diagonal in a small cell)
LINE = FONT_SIZE + 3  # height of a line of text
FITS = 340  # TensorBoard's image cards show about this many pixels across without scaling a picture down
MARGIN = 4


def _font(size: int = FONT_SIZE) -> ImageFont.FreeTypeFont:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _names(classes: Sequence[str]) -> list[str]:
    return [str(name)[:LABEL_CHARS] for name in classes]


def _upright(names: Sequence[str], cell: int) -> bool:
    """Whether every column's name fits across its cell (else it is written upwards)."""
    font = _font()
    return all(font.getlength(name) <= cell - 2 for name in names)


def confusion_geometry(classes: Sequence[str]) -> tuple[int, int, int]:
    """``(left, top, cell)``: where the matrix's cells start and their size in pixels,
    chosen so that ten classes fit in what TensorBoard shows unscaled (``FITS``)."""
    names = _names(classes)
    label = math.ceil(max((_font().getlength(name) for name in names), default=0)) + 2 * MARGIN
    # Left: the rotated "true class" title, then the row names; top: the title, then the column names.
    left = LINE + 2 * MARGIN + label
    cell = max(LINE + 2, min(48, (FITS - left - MARGIN) // max(len(names), 1)))
    return left, LINE + 2 * MARGIN + (LINE if _upright(names, cell) else label), cell


def confusion_picture(confusion: torch.Tensor, classes: Sequence[str]) -> torch.Tensor:
    """The confusion matrix as an RGB image (``3 x H x W``, uint8): rows are true
    classes, columns predicted ones, each named; a cell's blue is the share of its
    row, and its count is written in it when it fits."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    count, names, font, small = len(classes), _names(classes), _font(), _font(SMALL_FONT_SIZE)
    left, top, cell = confusion_geometry(classes)
    size = (left + count * cell + MARGIN, top + count * cell + MARGIN)
    picture = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(picture)
    matrix = confusion.double()
    shares = (matrix / matrix.sum(dim=1, keepdim=True).clamp(min=1)).tolist()
    for row in range(count):
        for column in range(count):
            share = shares[row][column]
            x, y = left + column * cell, top + row * cell
            shade = round(255 * (1 - share))
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=(shade, shade, 255), outline=(200, 200, 200))
            text = str(int(matrix[row, column]))
            fitting = next((f for f in (font, small) if f.getlength(text) <= cell - 2), None)
            if fitting is not None:
                colour = "white" if share > 0.5 else "black"
                draw.text((x + cell / 2, y + cell / 2), text, fill=colour, font=fitting, anchor="mm")
        draw.text((left - MARGIN, top + row * cell + cell / 2), names[row], fill="black", font=font, anchor="rm")
    draw.text((left + count * cell / 2, MARGIN), "predicted class", fill="black", font=font, anchor="mt")
    upright = _upright(names, cell)
    for column, name in enumerate(names):  # centred over its column, or written upwards ending just above it
        if upright:
            draw.text((left + column * cell + cell / 2, top - MARGIN), name, fill="black", font=font, anchor="mb")
        else:
            label = _sideways(name)
            picture.paste(label, (left + column * cell + (cell - label.width) // 2, top - MARGIN - label.height))
    title = _sideways("true class")
    picture.paste(title, (MARGIN, top + max(0, (count * cell - title.height) // 2)))
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)


def _sideways(text: str) -> Image.Image:
    """``text`` in black on white, turned a quarter to read upwards."""
    from PIL import Image, ImageDraw

    font = _font()
    image = Image.new("RGB", (max(1, math.ceil(font.getlength(text))), LINE), "white")
    ImageDraw.Draw(image).text((0, LINE / 2), text, fill="black", font=font, anchor="lm")
    return image.rotate(90, expand=True)


def example_indices(split: Split, classes: int, wanted: int) -> list[int]:
    """Up to ``wanted`` samples of ``split`` taken in turn from each class (a split
    read in class order would otherwise show one class), or spread evenly over
    the split when its targets are not class labels at hand."""
    from trainer_core import held_targets  # (imports torch: not when the plugin is merely listed)

    size = len(split)  # type: ignore[arg-type]
    targets = held_targets(split)
    if targets is None:
        targets = getattr(split, "targets", None)  # torchvision's folders list them
    if targets is not None and len(targets) == size and classes > 1:
        import torch

        labels = torch.as_tensor(targets)
        if labels.dim() == 1 and not labels.is_floating_point():
            members = [(labels == c).nonzero().flatten().tolist() for c in range(classes)]
            chosen: list[int] = []
            for turn in range(max((len(m) for m in members), default=0)):
                chosen.extend(m[turn] for m in members if turn < len(m))
            return chosen[:wanted]
    if size <= wanted:
        return list(range(size))
    return [round(k * (size - 1) / (wanted - 1)) if wanted > 1 else 0 for k in range(wanted)]


def example_images(split: Split, indices: list[int]) -> torch.Tensor:
    """The chosen samples' inputs as they are stored (before normalisation), stacked."""
    import torch

    inputs = getattr(split, "inputs", None)
    if isinstance(inputs, torch.Tensor):
        return inputs[torch.tensor(indices)]
    from trainer_core import read_sample

    return torch.stack([torch.as_tensor(read_sample(split, i)[0]) for i in indices])  # type: ignore[index]
