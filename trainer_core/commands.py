"""Everyday commands on trained models and past runs: ``trainer eval``,
``predict``, ``export`` and ``runs``.

Like :mod:`trainer_core.cli`, this module is cheap to import: torch and the
rest are imported inside the command bodies, so ``trainer --help`` stays fast.
A checkpoint holds the run's resolved config, so each command rebuilds the
model and the dataset (class names, input shape, normalisation, transforms)
exactly as the run had them, then loads the trained weights.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import click
import pluggy

from trainer_core.errorreport import debug_option, reports_errors
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

    @property
    def epoch(self) -> int | None:
        return (self.payload.get("state") or {}).get("epoch")


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint file as given, or the newest one in a run folder."""
    from trainer_core.checkpointing import find_checkpoint

    if not path.is_dir():
        return path  # load_checkpoint says clearly when it is missing
    try:
        return find_checkpoint(path)
    except UsageError:
        raise UsageError(
            f"--checkpoint {path}: no checkpoint file in this folder; give a .pt file, or a run folder "
            "trained with --plugins checkpoint"
        ) from None


def load_trained(path: Path, dataset: str | None = None, data_root: str | None = None) -> Trained:
    """Load a checkpoint and rebuild its model and dataset from its saved config.

    :param dataset: use this dataset instead of the run's (its default options).
    :param data_root: read the dataset's files from here instead of the run's folder.
    """
    from trainer_core.checkpointing import load_checkpoint
    from trainer_core.config import RunConfig, apply_mapping, set_field
    import torch

    from trainer_core.checkpointing import misfit_details
    from trainer_core.runner import build_model, load_dataset
    from trainer_core.task import check_fit, load_task, task_name

    path = resolve_checkpoint(path)
    payload = load_checkpoint(path)
    if not isinstance(payload.get("config"), dict) or not isinstance(payload.get("model"), dict):
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
    task = load_task(task_name(config.task, data), config.task_options)
    check_fit(task, data, config.dataset)
    task.setup(data, torch.device("cpu"))
    task.load_state_dict(payload.get("task") or task.state_dict())  # what the run learned (target scaling)
    # Initial weights (``weights=imagenet`` or a file) are replaced by the checkpoint's below:
    # not loading them spares the time and works where their file is absent.
    options = {k: v for k, v in config.model_options.items() if k != "weights"}
    model = build_model(config.model, options, data, task.output_size(data))
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError:
        outputs = f"{task.output_size(data)} {'classes' if task.name == 'classification' else 'outputs'}"
        raise UsageError(f"the weights in {path} do not fit model '{config.model}' built for dataset '{config.dataset}' "
                         f"({outputs}): {misfit_details(model.state_dict(), payload['model'])}") from None
    model.eval()
    return Trained(path, payload, config, data, model, task)


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
        except OSError as exc:  # PIL's UnidentifiedImageError is an OSError
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
    from plugins.class_accuracy import ClassAccuracy
    from trainer_core.data import DataBundle
    from trainer_core.trainer import Trainer

    classes = ClassAccuracy(table=False, matrix_file="") if trained.task.name == "classification" else None
    data = trained.data
    chosen = DataBundle(data.train, getattr(data, split), data.classes, data.input_shape, data.mean, data.std, data.task)
    config = dataclasses.replace(trained.config, device=device, batch_size=batch_size or trained.config.batch_size, plugins={})
    trainer = Trainer(trained.model, chosen, config, task=trained.task, plugins={"class-accuracy": classes} if classes else {},
                      pm=pm)
    trainer.state.epoch = trained.epoch or 0
    trainer.state.step = (trained.payload.get("state") or {}).get("step", 0)
    trainer.pm.hook.on_fit_start(trainer=trainer)
    return trainer.evaluate(), classes


def exportable(trained: Trained) -> nn.Module:
    """The module that is exported, in eval mode: the model preceded by the dataset's
    normalisation (if it has one) and followed by the task's :meth:`~trainer_core.Task.exported`."""
    import torch
    from torch import nn

    data, task, model = trained.data, trained.task, trained.model.cpu()
    shape = (1, -1, *[1] * (len(data.input_shape) - 1))

    class Exported(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.normalise = data.mean is not None or data.std is not None
            self.register_buffer("mean", torch.tensor(data.mean if data.mean is not None else [0.0]).view(shape))
            self.register_buffer("std", torch.tensor(data.std if data.std is not None else [1.0]).view(shape))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return task.exported(self.model((x - self.mean) / self.std if self.normalise else x))

    return Exported().eval()


def example_inputs(data: DataBundle, size: int) -> torch.Tensor:
    """A random batch of ``size`` inputs as the exported model takes them: token ids
    for a model of integer inputs, else floats in [0, 1]."""
    import torch

    held = getattr(data.train, "inputs", None)
    if held is not None and not held.is_floating_point() and held.dtype != torch.uint8:
        return torch.randint(0, max(2, len(data.classes)), (size, *data.input_shape), dtype=held.dtype)
    return torch.rand(size, *data.input_shape)


def export_model(trained: Trained, fmt: str, output: Path, tolerance: float = 1e-4) -> float:
    """Write the model (with normalisation) as ``fmt`` to ``output``.

    The file is built in memory and loaded back first: it replaces ``output``
    (atomically) only when its outputs match the model's on a random batch.

    :return: the largest difference between the file's outputs and the model's
        on a batch other than the one used to trace it.
    """
    import io

    import torch

    from trainer_core.files import atomic_write_bytes

    data = trained.data
    module = exportable(trained)
    example = example_inputs(data, 2)
    check = example_inputs(data, 3)  # another batch size: the file must not be fixed to the example's
    integers = not example.is_floating_point()
    metadata = json.dumps({
        "classes": [str(c) for c in data.classes],
        "input_shape": list(data.input_shape),
        "input": "token ids N x sequence length (int64)" if integers else
                 "float N x ..., as the trainer feeds batches before normalisation (image pixels scaled "
                 "to [0, 1]); the dataset's mean/std normalisation, if it has one, is inside the model",
        "task": trained.task.name,
        "output": trained.task.export_doc,
        "model": trained.config.model,
        "dataset": trained.config.dataset,
        "epoch": trained.epoch,
        "checkpoint": str(trained.path),
    }, indent=2)
    buffer = io.BytesIO()
    # torch.jit and the TorchScript-based ONNX exporter warn that they are deprecated upstream;
    # the files they write are still what many programs load, so the warnings are not the user's concern.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        expected = module(check)
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(module, example), buffer, _extra_files={EXPORT_METADATA: metadata})
            got = torch.jit.load(io.BytesIO(buffer.getvalue()))(check)
        elif fmt == "exported-program":
            program = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
            torch.export.save(program, buffer, extra_files={EXPORT_METADATA: metadata})
            got = torch.export.load(io.BytesIO(buffer.getvalue())).module()(check)
        else:  # onnx, offered only when the onnx package is importable
            import onnx
            from onnx.reference import ReferenceEvaluator

            names = ("images", "logits") if trained.task.name == "classification" else ("inputs", "outputs")
            torch.onnx.export(module, (example,), buffer, input_names=[names[0]], output_names=[names[1]],
                              dynamic_axes={names[0]: {0: "batch"}, names[1]: {0: "batch"}}, dynamo=False)
            document = onnx.load_from_string(buffer.getvalue())
            entry = document.metadata_props.add()
            entry.key, entry.value = EXPORT_METADATA, metadata
            buffer = io.BytesIO(document.SerializeToString())
            # onnx's own pure-Python runtime: no onnxruntime needed for the check.
            got = torch.from_numpy(ReferenceEvaluator(document).run(None, {names[0]: check.numpy()})[0])
    difference = float((got - expected).abs().max())
    if not difference <= tolerance:
        raise UsageError(f"the {fmt} file's outputs differ from the model's by {difference:.3g}, so nothing was written; "
                         "the model may not be traceable (data-dependent control flow)")
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(output, buffer.getvalue())
    return difference


def export_formats() -> list[str]:
    """The formats ``trainer export`` offers here."""
    import importlib.util

    formats = ["torchscript", "exported-program"]
    return formats + (["onnx"] if importlib.util.find_spec("onnx") is not None else [])


# -- trainer runs ---------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def describe_run(folder: Path, metric: str | None = None) -> dict[str, Any]:
    """One row of ``trainer runs``: what a run folder says about its run; the
    best of ``metric``, by default the run's headline metric (``val/acc`` for a
    run that did not record one)."""
    from trainer_core.config import tomllib
    from trainer_core.rundir import CONFIG, LOCK, METRICS, SUMMARY, lock_is_stale

    try:
        config = tomllib.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    summary = _read_json(folder / SUMMARY)
    records = []
    try:
        for line in (folder / METRICS).read_text(encoding="utf-8").splitlines():
            record = _read_json_line(line)
            if record is not None:
                records.append(record)
    except OSError:
        pass
    if metric is None:
        metric = summary.get("headline") if isinstance(summary, dict) and isinstance(summary.get("headline"), str) else None
        metric = metric or _headline_of(config.get("task"))
    best = best_record(records, metric)
    # A finished run says when it first started; a running or killed one, by its config file's time.
    started = (folder / CONFIG) if (folder / CONFIG).exists() else folder
    started_at = started.stat().st_mtime
    if isinstance(summary, dict):
        status = str(summary.get("status", "unknown"))
        duration = summary.get("duration_s")
        try:
            started_at = datetime.datetime.fromisoformat(str(summary["started"])).timestamp()
        except (KeyError, ValueError):
            pass  # a summary written before it recorded the start
    else:
        lock = folder / LOCK
        status = "running" if lock.exists() and not lock_is_stale(lock) else "incomplete"
        duration = None
    return {
        "name": folder.name,
        "path": str(folder),
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(started_at)),
        "model": _name(config.get("model")),
        "dataset": _name(config.get("dataset")),
        "epochs": records[-1].get("epoch") if records else None,
        "metric": metric,
        "best": best[metric] if best else None,
        "best_epoch": best.get("epoch") if best else None,
        "duration_s": duration,
        "status": status,
    }


def _headline_of(task: Any) -> str:
    """The headline metric of a run's saved ``[task]`` table (``val/acc`` when unknown)."""
    from trainer_core.entrypoints import TASKS, Registry

    name = task.get("name") if isinstance(task, dict) else None
    try:
        return str(Registry(TASKS).get(str(name)).load().headline) if name else "val/acc"
    except Exception:  # an uninstalled or broken task: the table still lists the run
        return "val/acc"


def _read_json_line(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None  # a line cut short by a kill
    return record if isinstance(record, dict) else None


def _name(table: Any) -> str:
    return str(table.get("name", "?")) if isinstance(table, dict) else "?"


def best_record(records: Sequence[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The record with the best finite ``metric``: lowest for losses and errors, highest otherwise."""
    from trainer_core.task import metric_mode  # the rule checkpoint and early-stopping rank by

    usable = [r for r in records if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    if not usable:
        return None
    return (min if metric_mode(metric) == "min" else max)(usable, key=lambda r: r[metric])


def find_runs(folder: Path) -> list[Path]:
    """``folder`` itself if it is a run folder, else the run folders in it."""
    from trainer_core.rundir import CONFIG, METRICS, SUMMARY

    def is_run(path: Path) -> bool:
        return any((path / name).exists() for name in (CONFIG, SUMMARY, METRICS))

    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder; runs are written under --runs-root (default: runs)")
    if is_run(folder):
        return [folder]
    return sorted(p for p in folder.iterdir() if p.is_dir() and is_run(p))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """Columns padded to their widest cell; ``right`` aligns numbers to the right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


# -- the commands ----------------------------------------------------------------

checkpoint_option = click.option(
    "--checkpoint", "checkpoint", required=True, type=click.Path(path_type=Path),
    help="A checkpoint file, or a run folder (its newest checkpoint).",
)
dataset_option = click.option("--dataset", help="Use this dataset instead of the run's (same classes expected).")
data_root_option = click.option("--data-root", help="Folder the dataset reads its files from, if not the run's.")
device_option = click.option("--device", default="cpu", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")


def add_commands(cli: click.Group, pm_factory: Callable[[], pluggy.PluginManager]) -> None:
    """Add ``eval``, ``predict``, ``export`` and ``runs`` to the ``trainer`` group."""

    @cli.command("eval")
    @checkpoint_option
    @dataset_option
    @data_root_option
    @click.option("--split", type=click.Choice(["val", "train"]), default="val", show_default=True,
                  help="Which split of the dataset to evaluate on.")
    @click.option("--batch-size", type=int, help="Samples per batch.  [default: the run's]")
    @device_option
    @click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
    @debug_option
    @reports_errors
    def eval_command(checkpoint: Path, dataset: str | None, data_root: str | None, split: str,
                     batch_size: int | None, device: str, as_json: bool) -> None:
        """The task's metrics of a saved model (for classification, per-class accuracy too).

        \b
        Examples:
          trainer eval --checkpoint runs/smallcnn-digits-20260101-120000
          trainer eval --checkpoint best.pt --split train --json
        """
        if batch_size is not None and batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1 (got {batch_size})")
        trained = load_trained(checkpoint, dataset, data_root)
        metrics, classes = evaluate(trained, split, device, batch_size, pm_factory())
        values = {key: value for key, value in metrics.items() if key.startswith("val/")}
        samples = len(getattr(trained.data, split))
        if as_json:
            result = {"checkpoint": str(trained.path), "model": trained.config.model, "dataset": trained.config.dataset,
                      "task": trained.task.name, "split": split, "epoch": trained.epoch, "samples": samples,
                      "metrics": values}
            if classes is not None:
                confusion = classes.confusion
                correct, total = confusion.diagonal().tolist(), confusion.sum(dim=1).tolist()
                result.update({
                    "loss": metrics["val/loss"],
                    "accuracy": metrics["val/acc"],
                    "classes": {str(name): {"correct": c, "total": t, "accuracy": c / t if t else None}
                                for name, c, t in zip(trained.data.classes, correct, total)},
                    "confusion_matrix": confusion.tolist(),
                })
            click.echo(json.dumps(result, indent=2))
            return
        click.echo(f"{trained.path}: {trained.config.model} on {trained.config.dataset} ({split} split, "
                   f"{samples} samples), epoch {trained.epoch}")
        if classes is not None:
            click.echo(f"loss {metrics['val/loss']:.4f}  accuracy {100 * metrics['val/acc']:.2f} %")
            click.echo(classes.format_table())
        else:
            click.echo("  ".join(f"{key.removeprefix('val/')} {value:.4f}" for key, value in values.items()))

    @cli.command()
    @checkpoint_option
    @click.argument("inputs", nargs=-1, required=True)
    @click.option("-k", "--top-k", type=int, default=5, show_default=True, help="Classes (or next tokens) to show per input.")
    @dataset_option
    @data_root_option
    @device_option
    @click.option("--json", "as_json", is_flag=True, help="Print the predictions as JSON.")
    @debug_option
    @reports_errors
    def predict(checkpoint: Path, inputs: tuple[str, ...], top_k: int, dataset: str | None, data_root: str | None,
                device: str, as_json: bool) -> None:
        """What a saved model predicts for INPUTS, as its task reads it.

        INPUTS are image files for a model of images (prepared as the run's
        validation images were: converted to the model's channels and size, or
        passed through the dataset's own transforms, then normalised), CSV files
        of feature vectors (one sample a line) for a model of vectors, and text
        prompts for a language model (its next token; 'trainer generate' writes on).

        \b
        Examples:
          trainer predict --checkpoint runs/my-run ant.jpg bee.jpg
          trainer predict --checkpoint best.pt --top-k 3 --json photos/*.png
          trainer predict --checkpoint runs/diabetes patients.csv
        """
        import torch

        if top_k < 1:
            raise UsageError(f"--top-k must be >= 1 (got {top_k})")
        trained = load_trained(checkpoint, dataset, data_root)
        data, task = trained.data, trained.task
        names = [str(c) for c in data.classes]
        if task.name == "language-model":
            labels = list(inputs)
            if not all(labels):
                raise UsageError("a prompt is empty; give the text whose next token to predict")
            rows = [predictions(trained, torch.tensor([encode_prompt(text, data)[-data.input_shape[0]:]]), device)[0]
                    for text in labels]
        else:
            paths = [Path(item) for item in inputs]
            if len(data.input_shape) == 3:
                labels, batch = [str(p) for p in paths], load_images(paths, data)
            else:
                batch, labels = load_rows(paths, data)
            rows = list(predictions(trained, batch, device))
        key = "prompt" if task.name == "language-model" else ("image" if len(data.input_shape) == 3 else "input")
        results = [{key: label, **task.describe(row, names, top_k)} for label, row in zip(labels, rows)]
        if as_json:
            click.echo(json.dumps(results, indent=2))
            return
        for result in results:
            click.echo(result[key])
            for line in task.format(result):
                click.echo(f"  {line}")

    @cli.command()
    @checkpoint_option
    @click.option("--prompt", default="", help="Text to start from (default: nothing).")
    @click.option("-n", "--tokens", type=int, default=200, show_default=True, help="Tokens to write after the prompt.")
    @click.option("--temperature", type=float, default=0.8, show_default=True,
                  help="Sampling temperature; 0 always takes the likeliest token.")
    @click.option("--top-k", type=int, default=0, show_default=True, help="Sample among the K likeliest tokens only (0: all).")
    @click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampling.")
    @data_root_option
    @device_option
    @debug_option
    @reports_errors
    def generate(checkpoint: Path, prompt: str, tokens: int, temperature: float, top_k: int, seed: int,
                 data_root: str | None, device: str) -> None:
        """Write text with a saved language model: the prompt, then sampled tokens.

        \b
        Examples:
          trainer generate --checkpoint runs/pydoc-charlm --prompt "The " -n 300
        """
        from trainer_core.runtime import select_device

        for name, value, low in (("--tokens", tokens, 1), ("--temperature", temperature, 0), ("--top-k", top_k, 0)):
            if not value >= low:
                raise UsageError(f"{name} must be >= {low} (got {value})")
        trained = load_trained(checkpoint, data_root=data_root)
        if not hasattr(trained.task, "generate"):
            raise UsageError(f"generate needs a language model; {trained.path} was trained for task '{trained.task.name}' "
                             "(use trainer predict)")
        data = trained.data
        ids = encode_prompt(prompt, data)
        if not ids:  # nothing to condition on: start from a new line (or the first token)
            ids = encode_prompt("\n", data) if "\n" in data.classes else [0]
        model = trained.model.to(select_device(device))
        new = trained.task.generate(model, ids, tokens, data.input_shape[0], temperature=temperature, top_k=top_k, seed=seed)
        click.echo(prompt + "".join(str(data.classes[i]) for i in new))

    @cli.command()
    @checkpoint_option
    @click.option("--format", "fmt", required=True, type=click.Choice(export_formats()),
                  help="torchscript (torch.jit.load), exported-program (torch.export.load), or onnx when installed.")
    @click.option("--output", required=True, type=click.Path(path_type=Path), help="File to write.")
    @data_root_option
    @debug_option
    @reports_errors
    def export(checkpoint: Path, fmt: str, output: Path, data_root: str | None) -> None:
        """Write a trained model to a file other programs load with plain torch.

        The file takes the model's inputs as the trainer feeds them before
        normalisation (float images scaled to [0, 1] as N x C x H x W, feature
        vectors, or token ids; any N): the dataset's normalisation is part of
        it.  It returns what the task says (logits for classification, values
        in the targets' units for regression).  Output names, the input shape
        and the task are stored inside as trainer.json.

        \b
        Examples:
          trainer export --checkpoint runs/my-run --format exported-program --output model.pt2
          python -c "import torch; m = torch.export.load('model.pt2').module(); print(m(torch.rand(1, 1, 8, 8)))"
        """
        if output.is_dir():
            raise UsageError(f"--output {output} is a folder; give a file name")
        trained = load_trained(checkpoint, data_root=data_root)
        export_model(trained, fmt, output)
        click.echo(f"wrote {output} ({fmt}) from {trained.path}: {trained.config.model} on {trained.config.dataset}, "
                   f"input {tuple(trained.data.input_shape)}, task {trained.task.name}, "
                   f"{trained.task.output_size(trained.data)} outputs")

    @cli.command()
    @click.argument("folder", required=False, default="runs", type=click.Path(path_type=Path))
    @click.option("--metric", help="Metric whose best value is shown (lowest for losses and errors, else highest).  "
                                   "[default: each run's headline metric, e.g. val/acc for classification]")
    @click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
    @debug_option
    @reports_errors
    def runs(folder: Path, metric: str | None, as_json: bool) -> None:
        """A table of past runs in FOLDER (default: runs), oldest first.

        Read from each run folder's config.toml, metrics.jsonl and
        summary.json; a run still writing shows as running, one killed before
        finishing as incomplete.
        """
        rows = sorted((describe_run(path, metric) for path in find_runs(folder)), key=lambda r: (r["date"], r["name"]))
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        if not rows:
            click.echo(f"no runs in {folder}")
            return
        # One metric for every row, or each run's own headline metric, named in its cell.
        headers = ["name", "date", "model", "dataset", "epochs", f"best {metric or 'headline metric'}", "duration", "status"]
        named = "" if metric else "{metric} "
        cells = [
            [r["name"], r["date"], r["model"], r["dataset"], str(r["epochs"] if r["epochs"] is not None else "-"),
             f"{named.format(metric=r['metric'])}{r['best']:.4f} (epoch {r['best_epoch']})" if r["best"] is not None else "-",
             _duration(r["duration_s"]), r["status"]]
            for r in rows
        ]
        click.echo(format_table(headers, cells, [False, False, False, False, True, True, True, False]))
