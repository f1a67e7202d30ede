"""A trained model rebuilt from its checkpoint, and what the everyday commands
do with it: read inputs (images, CSV rows, prompts), predict, evaluate.

A checkpoint holds the run's resolved config, so the model, the dataset (class
names, input shape, normalisation, transforms) and the task are rebuilt exactly
as the run had them, then the trained weights are loaded.  torch is imported
inside the functions: the CLI imports this module to list its commands.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import pluggy

from trainer_core.errors import UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from trainer_core.config import RunConfig
    from trainer_core.data import DataBundle
    from trainer_core.task import Task

#: Name of the JSON metadata stored inside an exported file.
EXPORT_METADATA = "trainer.json"


@dataclasses.dataclass
class Trained:
    """A model rebuilt from a checkpoint, with the data it was trained on."""

    path: Path
    payload: dict[str, Any]
    config: RunConfig
    data: DataBundle
    model: nn.Module
    task: Task
    #: Which checkpoint of a run folder ``path`` is, in words (``None``: a file given as is).
    chosen: str | None = None

    @property
    def epoch(self) -> int | None:
        return (self.payload.get("state") or {}).get("epoch")


def resolve_checkpoint(path: Path, which: str | None = None) -> tuple[Path, str | None]:
    """The checkpoint file to load for ``--checkpoint path [--which best|last]``, and
    which one it is in words (``None`` for a file given as is).

    For a run folder, ``best`` (the default) is the file its ``summary.json`` names as
    the best (what the checkpoint plugin kept as best by its monitored metric), or else
    its only ``checkpoints/best-*.pt``; ``last`` is its newest checkpoint.  A folder with
    no best checkpoint (``checkpoint.save_top_k=0``) gives its newest, saying so.
    """
    from trainer_core.checkpointing import CHECKPOINT_FOLDER, find_checkpoint, named_best_checkpoint

    if not path.is_dir():
        if which is not None:
            raise UsageError(f"--which chooses a checkpoint of a run folder; {path} is a file: leave --which out")
        return path, None  # load_checkpoint says clearly when it is missing
    if which != "last":
        named = named_best_checkpoint(path)
        if named is not None:
            return named, "the run's best checkpoint, as its summary.json names it"
        best = sorted(p for p in (path / CHECKPOINT_FOLDER).glob("best-*.pt") if p.is_file())
        if len(best) > 1:
            raise UsageError(f"--checkpoint {path}: its summary.json names no best checkpoint and the folder holds "
                             f"{len(best)} ({', '.join(p.name for p in best)}); give one of those files, or --which last")
        if best:
            return best[0], "the run's best checkpoint"
    try:
        newest = find_checkpoint(path)
    except UsageError:
        raise UsageError(
            f"--checkpoint {path}: no checkpoint file in this folder; give a .pt file, or a run folder "
            "trained with the checkpoint plugin (on by default)"
        ) from None
    return newest, "the run's last checkpoint" + ("" if which == "last" else " (it kept no best checkpoint)")


def load_trained(path: Path, dataset: str | None = None, data_root: str | None = None, which: str | None = None) -> Trained:
    """Load a checkpoint and rebuild its model and dataset from its saved config.

    :param path: a checkpoint file, or a run folder (:func:`resolve_checkpoint`; ``which``: ``best`` or ``last``).
    :param dataset: use this dataset instead of the run's (its default options).
    :param data_root: read the dataset's files from here instead of the run's folder.
    """
    import torch

    from trainer_core.checkpointing import checkpoint_weights, load_checkpoint, misfit_details
    from trainer_core.config import RunConfig, apply_mapping, set_field
    from trainer_core.runner import build_model, load_dataset
    from trainer_core.safetensors_file import as_checkpoint, is_safetensors
    from trainer_core.task import check_fit, load_task, task_name

    path, chosen = resolve_checkpoint(path, which)
    payload = as_checkpoint(path) if is_safetensors(path) else load_checkpoint(path)
    has_weights = isinstance(payload.get("model"), dict) or payload.get("shards") is not None
    if not isinstance(payload.get("config"), dict) or not has_weights:
        raise UsageError(
            f"checkpoint {path} has no saved run config (is it a bare state dict?); "
            "use a checkpoint written by a trainer run"
        )
    config = apply_mapping(RunConfig(), payload["config"], f"the config saved in {path}")
    if dataset is not None and dataset != config.dataset:
        set_field(config, "dataset", dataset, "--dataset")
        config.dataset_options = {}  # the run's options were for its own dataset
    if data_root is not None:
        config.data_root = data_root
    data = load_dataset(config.dataset, config.dataset_options, config.data_root)
    _check_expected(payload.get("expects"), data, path)
    task = load_task(task_name(config.task, data), config.task_options)
    check_fit(task, data, config.dataset)
    task.setup(data, torch.device("cpu"))
    task.load_state_dict(payload.get("task") or task.state_dict())  # what the run learned (target scaling)
    # Initial weights (``weights=imagenet`` or a file) are replaced by the checkpoint's below:
    # not loading them spares the time and works where their file is absent.
    options = {k: v for k, v in config.model_options.items() if k != "weights"}
    model = build_model(config.model, options, data, task.output_size(data))
    weights = checkpoint_weights(payload, model)
    try:
        model.load_state_dict(weights)
    except RuntimeError:
        outputs = f"{task.output_size(data)} {'classes' if task.name == 'classification' else 'outputs'}"
        raise UsageError(f"the weights in {path} do not fit model '{config.model}' built for dataset '{config.dataset}' "
                         f"({outputs}): {misfit_details(model.state_dict(), weights)}") from None
    model.eval()
    return Trained(path, payload, config, data, model, task, chosen)


def _check_expected(expects: dict[str, Any] | None, data: DataBundle, path: Path) -> None:
    """The dataset has the classes and input shape exported weights were trained on."""
    if expects is None:
        return
    classes, shape = [str(c) for c in data.classes], list(data.input_shape)
    if classes != expects["classes"]:
        raise UsageError(f"{path} was exported for {len(expects['classes'])} classes ({', '.join(expects['classes'][:5])}"
                         f"{' ...' if len(expects['classes']) > 5 else ''}), but this dataset has {len(classes)} "
                         f"({', '.join(classes[:5])}{' ...' if len(classes) > 5 else ''}); evaluate it on its own dataset")
    if shape != expects["input_shape"]:
        raise UsageError(f"{path} was exported for inputs of shape {tuple(expects['input_shape'])}, but this dataset's "
                         f"are {tuple(shape)}; evaluate it on its own dataset")


def image_shape(data: DataBundle, what: str) -> tuple[int, int, int]:
    """``(channels, height, width)`` of an image dataset; other inputs are an error."""
    shape = tuple(data.input_shape)
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise UsageError(f"{what} needs a model of 1- or 3-channel images; this one takes inputs of shape {shape}")
    return shape  # type: ignore[return-value]


def load_images(paths: Sequence[Path], data: DataBundle) -> torch.Tensor:
    """Read image files as the model's inputs before normalisation.

    A split with its own ``transform`` (a torchvision-style dataset) prepares
    each image exactly as validation images were; otherwise the image is
    converted to the model's channels, resized to its input size and kept as
    ``uint8``, which the core scales to [0, 1] like in-memory datasets.
    """
    import numpy as np
    import torch
    from PIL import Image

    channels, height, width = image_shape(data, "predict")
    transform = getattr(data.val, "transform", None)
    images = []
    for path in paths:
        try:
            with Image.open(path) as opened:
                image = opened.convert("L" if channels == 1 else "RGB")
        except FileNotFoundError:
            raise UsageError(f"image {path} does not exist") from None
        except (OSError, Image.DecompressionBombError) as exc:  # (UnidentifiedImageError is an OSError; a bomb is not)
            raise UsageError(f"{path} is not an image file that can be read: {exc}") from None
        if callable(transform):
            tensor = transform(image)
            if not isinstance(tensor, torch.Tensor):
                raise UsageError(f"the dataset's validation transform returned {type(tensor).__name__}, not a tensor")
        else:
            resized = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8)
            tensor = torch.from_numpy(resized.copy()).reshape(height, width, channels).permute(2, 0, 1)
        images.append(tensor)
    return torch.stack(images)


def load_rows(paths: Sequence[Path], data: DataBundle) -> tuple[torch.Tensor, list[str]]:
    """Read CSV files of feature vectors, one sample a line (a header line is
    skipped), as the model's inputs before normalisation; and a name per row
    (``FILE:LINE``)."""
    import math

    import torch

    size = math.prod(data.input_shape)
    rows, names = [], []
    for path in paths:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise UsageError(f"file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{path} cannot be read as CSV text: {exc}") from None
        for number, line in enumerate(lines, 1):
            cells = [c.strip() for c in line.split(",")]
            if not line.strip() or (number == 1 and not _numeric(cells[0])):
                continue  # blank, or a header
            if len(cells) != size or not all(_numeric(c) for c in cells):
                raise UsageError(f"{path}:{number}: expected {size} comma-separated numbers (the model's input "
                                 f"{tuple(data.input_shape)}), got {line[:60]!r}")
            rows.append([float(c) for c in cells])
            names.append(f"{path}:{number}")
    if not rows:
        raise UsageError(f"no rows of numbers in {', '.join(map(str, paths))}")
    return torch.tensor(rows).view(len(rows), *data.input_shape), names


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def encode_prompt(text: str, data: DataBundle) -> list[int]:
    """``text`` as token ids of the dataset's vocabulary (its ``classes``, one string per id)."""
    ids = {token: index for index, token in enumerate(str(c) for c in data.classes)}
    unknown = next((ch for ch in text if ch not in ids), None)
    if unknown is not None:
        raise UsageError(f"the prompt holds {unknown!r}, which is not in the model's vocabulary of {len(ids)} tokens")
    return [ids[ch] for ch in text]


def predictions(trained: Trained, inputs: torch.Tensor, device: str = "cpu", batch_size: int = 64) -> torch.Tensor:
    """The task's predictions (:meth:`~trainer_core.Task.predict`) for un-normalised
    ``inputs``, normalised as in training."""
    import torch

    from trainer_core.data import Batches, TensorSplit
    from trainer_core.runtime import select_device

    target = select_device(device)
    model = trained.model.to(target)
    split = TensorSplit(inputs, torch.zeros(len(inputs), dtype=torch.int64))
    batches = Batches(split, batch_size, target, shuffle=False, mean=trained.data.mean, std=trained.data.std,
                      input_dims=len(trained.data.input_shape))
    with torch.no_grad():
        return torch.cat([trained.task.predict(model(x)).cpu() for x, _ in batches.iterate()])


def evaluate(trained: Trained, split: str, device: str, batch_size: int | None,
             pm: pluggy.PluginManager) -> tuple[dict[str, float], Any | None]:
    """Run the core's evaluation on ``split``; with the class-accuracy plugin for classification.

    :return: the metrics and the plugin (for its confusion matrix and table), or ``None``.
    """
    from trainer_core_plugins.class_accuracy import ClassAccuracy
    from trainer_core.data import DataBundle
    from trainer_core.trainer import Trainer

    classes = ClassAccuracy(table=False, matrix_file="") if trained.task.name == "classification" else None
    data = trained.data
    chosen = DataBundle(data.train, getattr(data, split), data.classes, data.input_shape, data.mean, data.std, data.task)
    # In this one process, with the whole weights, whatever strategy trained them.
    config = dataclasses.replace(trained.config, device=device, batch_size=batch_size or trained.config.batch_size, plugins={},
                                 strategy="auto")
    trainer = Trainer(trained.model, chosen, config, task=trained.task, plugins={"class-accuracy": classes} if classes else {},
                      pm=pm)
    trainer.state.epoch = trained.epoch or 0
    trainer.state.step = (trained.payload.get("state") or {}).get("step", 0)
    trainer.pm.hook.on_fit_start(trainer=trainer)
    try:
        return trainer.evaluate(), classes
    finally:
        trainer.close_loaders()


