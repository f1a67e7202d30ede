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

from trainer_core.cli import debug_option, reports_errors
from trainer_core.errors import UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from trainer_core.config import RunConfig
    from trainer_core.data import DataBundle

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
    from trainer_core.runner import build_model, load_dataset

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
    # Initial weights (``weights=imagenet`` or a file) are replaced by the checkpoint's below:
    # not loading them spares the time and works where their file is absent.
    options = {k: v for k, v in config.model_options.items() if k != "weights"}
    model = build_model(config.model, options, data)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UsageError(
            f"the weights in {path} do not fit model '{config.model}' built for dataset '{config.dataset}' "
            f"({data.num_classes} classes): {first}"
        ) from None
    model.eval()
    return Trained(path, payload, config, data, model)


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


def predict_proba(trained: Trained, inputs: torch.Tensor, device: str = "cpu", batch_size: int = 64) -> torch.Tensor:
    """Class probabilities for un-normalised ``inputs``, normalised as in training."""
    import torch

    from trainer_core.data import Batches, TensorSplit
    from trainer_core.runtime import select_device

    target = select_device(device)
    model = trained.model.to(target)
    split = TensorSplit(inputs, torch.zeros(len(inputs), dtype=torch.int64))
    batches = Batches(split, batch_size, target, shuffle=False, mean=trained.data.mean, std=trained.data.std)
    with torch.no_grad():
        return torch.cat([torch.softmax(model(x).float(), dim=1).cpu() for x, _ in batches.iterate()])


def evaluate(trained: Trained, split: str, device: str, batch_size: int | None, pm: pluggy.PluginManager) -> tuple[dict[str, float], Any]:
    """Run the core's evaluation on ``split`` with the class-accuracy plugin.

    :return: the metrics and the plugin (for its confusion matrix and table).
    """
    from plugins.class_accuracy import ClassAccuracy
    from trainer_core.data import DataBundle
    from trainer_core.trainer import Trainer

    classes = ClassAccuracy(table=False, matrix_file="")
    data = trained.data
    chosen = DataBundle(data.train, getattr(data, split), data.classes, data.input_shape, data.mean, data.std)
    config = dataclasses.replace(trained.config, device=device, batch_size=batch_size or trained.config.batch_size, plugins={})
    trainer = Trainer(trained.model, chosen, config, plugins={"class-accuracy": classes}, pm=pm)
    trainer.state.epoch = trained.epoch or 0
    trainer.state.step = (trained.payload.get("state") or {}).get("step", 0)
    trainer.pm.hook.on_fit_start(trainer=trainer)
    return trainer.evaluate(), classes


def with_normalisation(model: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None) -> nn.Module:
    """``model`` preceded by the dataset's normalisation, in eval mode: the module that is exported."""
    import torch
    from torch import nn

    class WithNormalisation(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            shape = (1, -1, 1, 1)
            self.register_buffer("mean", torch.tensor(mean if mean is not None else [0.0]).view(shape))
            self.register_buffer("std", torch.tensor(std if std is not None else [1.0]).view(shape))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model((x - self.mean) / self.std)

    return WithNormalisation().eval()


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
    module = with_normalisation(trained.model.cpu(), data.mean, data.std)
    example = torch.rand(2, *data.input_shape)
    check = torch.rand(3, *data.input_shape)  # another batch size: the file must not be fixed to the example's
    metadata = json.dumps({
        "classes": [str(c) for c in data.classes],
        "input_shape": list(data.input_shape),
        "input": "float N x C x H x W, as the trainer feeds batches before normalisation (image pixels scaled "
                 "to [0, 1]); the dataset's mean/std normalisation, if it has one, is inside the model",
        "output": "logits N x classes (softmax gives probabilities)",
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

            torch.onnx.export(module, (example,), buffer, input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
            document = onnx.load_from_string(buffer.getvalue())
            entry = document.metadata_props.add()
            entry.key, entry.value = EXPORT_METADATA, metadata
            buffer = io.BytesIO(document.SerializeToString())
            # onnx's own pure-Python runtime: no onnxruntime needed for the check.
            got = torch.from_numpy(ReferenceEvaluator(document).run(None, {"images": check.numpy()})[0])
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


def describe_run(folder: Path, metric: str) -> dict[str, Any]:
    """One row of ``trainer runs``: what a run folder says about its run."""
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
    from plugins.checkpoint import lower_is_better  # the rule checkpoint and early-stopping rank by

    usable = [r for r in records if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    if not usable:
        return None
    return (min if lower_is_better(metric) else max)(usable, key=lambda r: r[metric])


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
        """Loss, accuracy and per-class accuracy of a saved model.

        \b
        Examples:
          trainer eval --checkpoint runs/smallcnn-digits-20260101-120000
          trainer eval --checkpoint best.pt --split train --json
        """
        if batch_size is not None and batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1 (got {batch_size})")
        trained = load_trained(checkpoint, dataset, data_root)
        metrics, classes = evaluate(trained, split, device, batch_size, pm_factory())
        confusion = classes.confusion
        correct, total = confusion.diagonal().tolist(), confusion.sum(dim=1).tolist()
        if as_json:
            click.echo(json.dumps({
                "checkpoint": str(trained.path),
                "model": trained.config.model,
                "dataset": trained.config.dataset,
                "split": split,
                "epoch": trained.epoch,
                "samples": sum(total),
                "loss": metrics["val/loss"],
                "accuracy": metrics["val/acc"],
                "classes": {str(name): {"correct": c, "total": t, "accuracy": c / t if t else None}
                            for name, c, t in zip(trained.data.classes, correct, total)},
                "confusion_matrix": confusion.tolist(),
            }, indent=2))
            return
        click.echo(f"{trained.path}: {trained.config.model} on {trained.config.dataset} ({split} split, "
                   f"{sum(total)} samples), epoch {trained.epoch}")
        click.echo(f"loss {metrics['val/loss']:.4f}  accuracy {100 * metrics['val/acc']:.2f} %")
        click.echo(classes.format_table())

    @cli.command()
    @checkpoint_option
    @click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
    @click.option("-k", "--top-k", type=int, default=5, show_default=True, help="Classes to show per image.")
    @dataset_option
    @data_root_option
    @device_option
    @click.option("--json", "as_json", is_flag=True, help="Print the predictions as JSON.")
    @debug_option
    @reports_errors
    def predict(checkpoint: Path, images: tuple[Path, ...], top_k: int, dataset: str | None, data_root: str | None,
                device: str, as_json: bool) -> None:
        """Top classes with probabilities for image files.

        Images are prepared as the run's validation images were: converted to
        the model's channels and size (or passed through the dataset's own
        transforms) and normalised with the dataset's mean and std.

        \b
        Examples:
          trainer predict --checkpoint runs/my-run ant.jpg bee.jpg
          trainer predict --checkpoint best.pt --top-k 3 --json photos/*.png
        """
        if top_k < 1:
            raise UsageError(f"--top-k must be >= 1 (got {top_k})")
        trained = load_trained(checkpoint, dataset, data_root)
        probabilities = predict_proba(trained, load_images(images, trained.data), device)
        values, indices = probabilities.topk(min(top_k, probabilities.shape[1]), dim=1)
        classes = [str(c) for c in trained.data.classes]
        results = [
            {"image": str(path),
             "predictions": [{"class": classes[i], "index": i, "probability": p} for p, i in zip(v.tolist(), ix.tolist())]}
            for path, v, ix in zip(images, values, indices)
        ]
        if as_json:
            click.echo(json.dumps(results, indent=2))
            return
        width = max(len(c) for c in classes)
        for result in results:
            click.echo(result["image"])
            for rank, p in enumerate(result["predictions"], 1):
                click.echo(f"  {rank}. {p['class']:<{width}}  {100 * p['probability']:6.2f} %")

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

        The file takes float images scaled to [0, 1] (N x C x H x W, any N):
        the dataset's normalisation is part of it.  It returns logits.  Class
        names and the input shape are stored inside as trainer.json.

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
                   f"input {tuple(trained.data.input_shape)}, {len(trained.data.classes)} classes")

    @cli.command()
    @click.argument("folder", required=False, default="runs", type=click.Path(path_type=Path))
    @click.option("--metric", default="val/acc", show_default=True,
                  help="Metric whose best value is shown (lowest for losses and errors, else highest).")
    @click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
    @debug_option
    @reports_errors
    def runs(folder: Path, metric: str, as_json: bool) -> None:
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
        headers = ["name", "date", "model", "dataset", "epochs", f"best {metric}", "duration", "status"]
        cells = [
            [r["name"], r["date"], r["model"], r["dataset"], str(r["epochs"] if r["epochs"] is not None else "-"),
             f"{r['best']:.4f} (epoch {r['best_epoch']})" if r["best"] is not None else "-",
             _duration(r["duration_s"]), r["status"]]
            for r in rows
        ]
        click.echo(format_table(headers, cells, [False, False, False, False, True, True, True, False]))
