"""Everyday commands on trained models and past runs: ``trainer eval``,
``predict``, ``generate``, ``export`` and ``runs``.

Like :mod:`trainer_core.cli`, this module is cheap to import: torch and the
rest are imported inside the command bodies, so ``trainer --help`` stays fast.
The work is in :mod:`trainer_core.trained` (rebuilding a model from its
checkpoint, inputs, predictions), :mod:`trainer_core.exporting` and
:mod:`trainer_core.runlist`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import click
import pluggy

from trainer_core.errorreport import debug_option, reports_errors
from trainer_core.errors import UsageError
from trainer_core.exporting import export_formats, export_model
from trainer_core.runlist import format_duration, describe_run, find_runs, format_table
from trainer_core.trained import Trained, encode_prompt, evaluate, load_images, load_rows, load_trained, predictions


def checkpoint_option(command: Callable[..., None]) -> Callable[..., None]:
    """``--checkpoint FILE|RUN_FOLDER`` and ``--which best|last`` (which checkpoint of a run folder)."""
    command = click.option("--which", type=click.Choice(["best", "last"]),
                           help="With a run folder: its best checkpoint (the one its summary.json names) or its "
                                "last.  [default: best]")(command)
    return click.option(
        "--checkpoint", "checkpoint", required=True, type=click.Path(path_type=Path),
        help="A checkpoint file, a run folder (its best checkpoint; --which last: its last), or weights from "
             "'trainer export --format safetensors'.",
    )(command)


def say_chosen(trained: Trained) -> None:
    """Once a command has done its work (an error stays one line), say on stderr which file of a run folder it took."""
    if trained.chosen is not None:
        click.echo(f"using {trained.path} ({trained.chosen})", err=True)


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
    def eval_command(checkpoint: Path, which: str | None, dataset: str | None, data_root: str | None, split: str,
                     batch_size: int | None, device: str, as_json: bool) -> None:
        """The task's metrics of a saved model (for classification, per-class accuracy too).

        \b
        Examples:
          trainer eval --checkpoint runs/smallcnn-digits-20260101-120000
          trainer eval --checkpoint best.pt --split train --json
        """
        if batch_size is not None and batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1 (got {batch_size})")
        trained = load_trained(checkpoint, dataset, data_root, which)
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
            say_chosen(trained)
            return
        click.echo(f"{trained.path}: {trained.config.model} on {trained.config.dataset} ({split} split, "
                   f"{samples} samples), epoch {trained.epoch}")
        if classes is not None:
            click.echo(f"loss {metrics['val/loss']:.4f}  accuracy {100 * metrics['val/acc']:.2f} %")
            click.echo(classes.format_table())
        else:
            click.echo("  ".join(f"{key.removeprefix('val/')} {value:.4f}" for key, value in values.items()))
        say_chosen(trained)

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
    def predict(checkpoint: Path, which: str | None, inputs: tuple[str, ...], top_k: int, dataset: str | None, data_root: str | None,
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
        trained = load_trained(checkpoint, dataset, data_root, which)
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
            say_chosen(trained)
            return
        for result in results:
            click.echo(result[key])
            for line in task.format(result):
                click.echo(f"  {line}")
        say_chosen(trained)

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
    def generate(checkpoint: Path, which: str | None, prompt: str, tokens: int, temperature: float, top_k: int, seed: int,
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
        trained = load_trained(checkpoint, data_root=data_root, which=which)
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
        say_chosen(trained)

    @cli.command()
    @checkpoint_option
    @click.option("--format", "fmt", required=True, type=click.Choice(export_formats()),
                  help="torchscript (torch.jit.load), exported-program (torch.export.load), safetensors (the weights "
                       "alone, for safetensors.torch.load_file), or onnx when installed.")
    @click.option("--output", required=True, type=click.Path(path_type=Path), help="File to write.")
    @data_root_option
    @debug_option
    @reports_errors
    def export(checkpoint: Path, which: str | None, fmt: str, output: Path, data_root: str | None) -> None:
        """Write a trained model to a file other programs load with plain torch.

        The file takes the model's inputs as the trainer feeds them before
        normalisation (float images scaled to [0, 1] as N x C x H x W, feature
        vectors, or token ids; any N): the dataset's normalisation is part of
        it.  It returns what the task says (logits for classification, values
        in the targets' units for regression).  Output names, the input shape
        and the task are stored inside as trainer.json.

        safetensors writes the model's weights alone (a state dict, no
        normalisation) with trainer.json in the file's metadata: the model and
        dataset names and options, the task, the classes.  trainer eval,
        predict and -o model.weights= read it back.

        \b
        Examples:
          trainer export --checkpoint runs/my-run --format exported-program --output model.pt2
          trainer export --checkpoint runs/my-run --format safetensors --output model.safetensors
          python -c "import torch; m = torch.export.load('model.pt2').module(); print(m(torch.rand(1, 1, 8, 8)))"
        """
        if output.is_dir():
            raise UsageError(f"--output {output} is a folder; give a file name")
        trained = load_trained(checkpoint, data_root=data_root, which=which)
        export_model(trained, fmt, output)
        click.echo(f"wrote {output} ({fmt}) from {trained.path}: {trained.config.model} on {trained.config.dataset}, "
                   f"input {tuple(trained.data.input_shape)}, task {trained.task.name}, "
                   f"{trained.task.output_size(trained.data)} outputs")
        say_chosen(trained)

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
        finishing as incomplete, one whose files are damaged as unreadable
        (what is wrong follows the table, on stderr).
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
             format_duration(r["duration_s"]), r["status"]]
            for r in rows
        ]
        click.echo(format_table(headers, cells, [False, False, False, False, True, True, True, False]))
        for r in rows:
            if r["problem"]:
                click.echo(f"{r['name']}: unreadable: {r['problem']}", err=True)
