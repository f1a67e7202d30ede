"""Pictures the tensorboard plugin logs, drawn to be read by a person: the
confusion matrix with its class names and axis titles, and which validation
images the image grid shows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from torch.utils.data import Dataset

    from trainer_core import TensorSplit

    Split = TensorSplit | Dataset  # (a split of a DataBundle)

LABEL_CHARS = 12  # class names are cut to this many characters
CHAR = (6, 11)  # PIL's default bitmap font: width and height of a character
MARGIN = 4


def confusion_geometry(classes: Sequence[str]) -> tuple[int, int, int]:
    """``(left, top, cell)``: where the matrix's cells start and their size in pixels."""
    cell = max(16, min(48, 480 // max(len(classes), 1)))
    label = CHAR[0] * max((len(str(name)[:LABEL_CHARS]) for name in classes), default=1) + 2 * MARGIN
    # Left: the rotated "true class" title, then the row names; top: the title, then the column names, rotated.
    return CHAR[1] + 2 * MARGIN + label, CHAR[1] + 2 * MARGIN + label, cell


def confusion_picture(confusion: torch.Tensor, classes: Sequence[str]) -> torch.Tensor:
    """The confusion matrix as an RGB image (``3 x H x W``, uint8): rows are true
    classes, columns predicted ones, each named; a cell's blue is the share of its
    row, and its count is written in it when it fits."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    count = len(classes)
    left, top, cell = confusion_geometry(classes)
    size = (left + count * cell + MARGIN, top + count * cell + MARGIN)
    picture = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(picture)
    matrix = confusion.double()
    shares = (matrix / matrix.sum(dim=1, keepdim=True).clamp(min=1)).tolist()
    names = [str(name)[:LABEL_CHARS] for name in classes]
    for row in range(count):
        for column in range(count):
            share = shares[row][column]
            x, y = left + column * cell, top + row * cell
            shade = round(255 * (1 - share))
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=(shade, shade, 255), outline=(200, 200, 200))
            text = str(int(matrix[row, column]))
            if len(text) * CHAR[0] <= cell - 2:
                colour = "white" if share > 0.5 else "black"
                draw.text((x + (cell - len(text) * CHAR[0]) // 2, y + (cell - CHAR[1]) // 2), text, fill=colour)
        draw.text((left - MARGIN - len(names[row]) * CHAR[0], top + row * cell + (cell - CHAR[1]) // 2), names[row],
                  fill="black")
    draw.text((left + (count * cell - 15 * CHAR[0]) // 2, MARGIN), "predicted class", fill="black")
    for column, name in enumerate(names):  # written upwards, ending just above its column
        label = _sideways(name)
        picture.paste(label, (left + column * cell + (cell - CHAR[1]) // 2, top - MARGIN - label.height))
    title = _sideways("true class")
    picture.paste(title, (MARGIN, top + max(0, (count * cell - title.height) // 2)))
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)


def _sideways(text: str) -> Image.Image:
    """``text`` in black on white, turned a quarter to read upwards."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (max(1, len(text) * CHAR[0]), CHAR[1]), "white")
    ImageDraw.Draw(image).text((0, 0), text, fill="black")
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
