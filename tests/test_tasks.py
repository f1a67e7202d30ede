"""Tasks: each built-in task's metrics against scikit-learn's, sums that add up
over batches (and so over ranks), each task end to end from the command line,
in one process and in two, and a third-party task from an entry point."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from sklearn import metrics as skm

from trainer_core import DataBundle, TensorSplit, UsageError
from trainer_core.cli import make_cli
from trainer_core.task import Task, load_task
from trainer_core.testing import run_tiny, tiny_model

CPU = torch.device("cpu")


def invoke(*args: object) -> tuple[int, str]:
    """The exit status, and what the command printed: its results (stdout) or its error (stderr). What a
    command that worked says on stderr (which checkpoint of a run folder it used) is not part of its results."""
    result = CliRunner().invoke(make_cli(), [str(a) for a in args])
    return result.exit_code, result.stdout if result.exit_code == 0 else result.stderr


def ready(name: str, data: DataBundle, **options: object) -> Task:
    task = load_task(name, options)
    task.check(data)
    task.setup(data, CPU)
    return task


def evaluated(task: Task, outputs: torch.Tensor, targets: torch.Tensor, cuts: tuple[int, ...] = ()) -> dict[str, float]:
    """The task's metrics over the batch, accumulated in parts cut at ``cuts``."""
    sums = task.new_sums(CPU)
    for out, tgt in zip(torch.tensor_split(outputs, list(cuts)), torch.tensor_split(targets, list(cuts))):
        task.add_sums(sums, out, tgt)
    return task.metrics(sums)


def bundle(train_targets: torch.Tensor, val_targets: torch.Tensor, classes: list[str], inputs: int = 3) -> DataBundle:
    return DataBundle(TensorSplit(torch.randn(len(train_targets), inputs), train_targets),
                      TensorSplit(torch.randn(len(val_targets), inputs), val_targets), classes, (inputs,))


# -- metrics ------------------------------------------------------------------


def test_classification_metrics_are_cross_entropy_and_accuracy() -> None:
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 4, (50,), generator=gen)
    outputs = torch.randn(50, 4, generator=gen)
    task = ready("classification", bundle(targets, targets, list("abcd")))
    got = evaluated(task, outputs, targets, (17, 33))
    assert got["val/acc"] == skm.accuracy_score(targets, outputs.argmax(1))
    assert got["val/loss"] == pytest.approx(skm.log_loss(targets, outputs.double().softmax(1), labels=range(4)), rel=1e-5)


def test_regression_metrics_are_scikit_learns_in_the_targets_units() -> None:
    gen = torch.Generator().manual_seed(1)
    train = torch.randn(200, 2, generator=gen) * torch.tensor([50.0, 0.1]) + torch.tensor([150.0, -3.0])
    targets = torch.randn(40, 2, generator=gen) * torch.tensor([50.0, 0.1]) + torch.tensor([150.0, -3.0])
    task = ready("regression", bundle(train, targets, ["a", "b"]))
    # The model works in standardised units: its outputs are scaled back for the metrics.
    standardised = (targets - train.mean(0)) / train.std(0) + 0.3 * torch.randn(40, 2, generator=gen)
    predicted = task.predict(standardised)
    got = evaluated(task, standardised, targets, (11,))
    assert got["val/mse"] == pytest.approx(skm.mean_squared_error(targets, predicted), rel=1e-5)
    assert got["val/mae"] == pytest.approx(skm.mean_absolute_error(targets, predicted), rel=1e-5)
    assert got["val/r2"] == pytest.approx(skm.r2_score(targets, predicted), rel=1e-5)
    assert 0.5 < got["val/r2"] < 1  # both targets, in their very different scales, count alike


def test_regression_without_standardisation_takes_outputs_as_values() -> None:
    targets = torch.tensor([1.0, 2.0, 3.0, 4.0])
    task = ready("regression", bundle(targets, targets, ["y"]), standardize=False)
    got = evaluated(task, torch.tensor([[1.0], [2.0], [3.0], [5.0]]), targets)
    assert (got["val/mse"], got["val/mae"], got["val/loss"]) == (0.25, 0.25, 0.25)
    assert got["val/r2"] == pytest.approx(1 - 1 / 5)


@pytest.mark.parametrize("loss", ["l1", "huber"])
def test_regression_losses(loss: str) -> None:
    targets = torch.tensor([0.0, 0.0])
    task = ready("regression", bundle(targets, targets, ["y"]), loss=loss, standardize=False)
    value = task.loss(torch.tensor([[3.0], [0.5]]), targets)
    assert float(value) == pytest.approx({"l1": 1.75, "huber": (2.5 + 0.125) / 2}[loss])


def test_multilabel_metrics_are_scikit_learns() -> None:
    gen = torch.Generator().manual_seed(2)
    targets = (torch.rand(60, 5, generator=gen) < 0.3).float()
    targets[:, 4] = 0  # a label never present: F1 0 for it, as zero_division=0 says
    outputs = torch.randn(60, 5, generator=gen) + 2 * (targets - 0.5)
    task = ready("multilabel", bundle(targets, targets, [f"l{i}" for i in range(5)]))
    got = evaluated(task, outputs, targets, (7, 31))
    predicted = (outputs.sigmoid() >= 0.5).int()
    assert got["val/f1_micro"] == pytest.approx(skm.f1_score(targets, predicted, average="micro", zero_division=0))
    assert got["val/f1_macro"] == pytest.approx(skm.f1_score(targets, predicted, average="macro", zero_division=0))
    assert got["val/exact_match"] == pytest.approx(skm.accuracy_score(targets, predicted))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(outputs, targets)
    assert got["val/loss"] == pytest.approx(float(bce), rel=1e-6)


def test_language_model_metrics_are_per_token() -> None:
    gen = torch.Generator().manual_seed(3)
    targets = torch.randint(0, 7, (6, 10), generator=gen)
    outputs = torch.randn(6, 10, 7, generator=gen)
    data = DataBundle(TensorSplit(targets, targets), TensorSplit(targets, targets), list("abcdefg"), (10,))
    got = evaluated(ready("language-model", data), outputs, targets, (1, 4))
    nats = float(torch.nn.functional.cross_entropy(outputs.reshape(-1, 7), targets.reshape(-1)))
    assert got["val/loss"] == pytest.approx(nats, rel=1e-6)
    assert got["val/bits_per_token"] == pytest.approx(nats / math.log(2), rel=1e-6)
    assert got["val/perplexity"] == pytest.approx(math.exp(nats), rel=1e-6)


def test_targets_of_another_kind_are_refused_naming_what_was_found() -> None:
    floats = torch.randn(10)
    with pytest.raises(ValueError, match="float32 values, not one class index per sample"):
        load_task("classification").check(bundle(floats, floats, ["a", "b"]))
    with pytest.raises(ValueError, match="int64, not floats"):
        load_task("regression").check(bundle(floats.long(), floats.long(), ["y"]))
    with pytest.raises(ValueError, match="values other than 0 and 1"):
        load_task("multilabel").check(bundle(torch.full((4, 2), 2.0), torch.zeros(4, 2), ["a", "b"]))
    with pytest.raises(ValueError, match="class indices outside 0..1"):
        load_task("classification").check(bundle(torch.tensor([0, 2]), torch.tensor([0, 1]), ["a", "b"]))


def test_task_options_are_checked_by_annotation_in_one_line() -> None:
    with pytest.raises(UsageError, match=r"option task.loss='cubic' is not a valid mse\|l1\|huber"):
        load_task("regression", {"loss": "cubic"})
    with pytest.raises(UsageError, match=r"task 'classification': label_smoothing must be in \[0, 1\)"):
        load_task("classification", {"label_smoothing": "1.5"})
    with pytest.raises(UsageError, match=r"unknown task 'regresion' \(did you mean 'regression'\?\)"):
        load_task("regresion")


def test_class_weights_and_label_smoothing_change_the_loss() -> None:
    targets = torch.tensor([0, 1, 1])
    outputs = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.5, 0.0]])
    data = bundle(targets, targets, ["a", "b"])
    plain = float(ready("classification", data).loss(outputs, targets))
    weighted = float(ready("classification", data, class_weights=[1.0, 3.0]).loss(outputs, targets))
    smoothed = float(ready("classification", data, label_smoothing=0.2).loss(outputs, targets))
    expected = torch.nn.functional.cross_entropy(outputs, targets, weight=torch.tensor([1.0, 3.0]))
    assert weighted == pytest.approx(float(expected)) and weighted != pytest.approx(plain) and smoothed != pytest.approx(plain)


# -- end to end -----------------------------------------------------------------

# Each task on real data where this machine has it (multi-label: synthetic, none ships offline).
JOBS = {
    "classification": ["--dataset", "breast-cancer", "--model", "mlp", "-o", "model.hidden=16"],
    "regression": ["--dataset", "diabetes", "--model", "mlp", "-o", "model.hidden=16"],
    "multilabel": ["--dataset", "fake-multilabel", "--model", "mlp", "-o", "model.hidden=16"],
    "language-model": ["--dataset", "pydoc-chars", "-o", "dataset.chars=6000", "-o", "dataset.block_size=16",
                       "--model", "tiny-gpt", "-o", "model.width=16", "-o", "model.depth=1", "-o", "model.heads=2"],
}
COMMON = ["--batch-size", "16", "--optimizer", "sgd", "--lr", "0.05", "--seed", "1", "--device", "cpu", "--quiet",
          "--log-every", "5", "--plugins", "checkpoint", "-o", "checkpoint.restore_best=false"]


def metrics_lines(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task", list(JOBS))
def test_each_task_trains_resumes_evaluates_predicts_and_exports(task: str, tmp_path: Path) -> None:
    job = [*JOBS[task], *COMMON]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    code, output = invoke("run", *job, "--epochs", "3", "--run-dir", straight)
    assert code == 0, output
    summary = json.loads((straight / "summary.json").read_text())
    assert (summary["status"], summary["task"]) == ("completed", task)
    assert set(load_task(task).modes) <= set(summary["final"])
    # The checkpoint plugin ranked by the task's headline metric.
    headline = summary["headline"]
    assert any(p.name.startswith("best-") and headline.replace("/", "_") in p.name for p in (straight / "checkpoints").iterdir())

    # Two epochs, then a resume to three: the same evaluations as the straight run.
    assert invoke("run", *job, "--epochs", "2", "--run-dir", resumed)[0] == 0
    code, output = invoke("run", *job, "--epochs", "3", "--resume", resumed)
    assert code == 0, output
    assert metrics_lines(resumed) == metrics_lines(straight)

    code, output = invoke("eval", "--checkpoint", straight / "checkpoints" / "last.pt", "--json")
    assert code == 0, output
    result = json.loads(output)
    assert result["task"] == task
    for key in load_task(task).modes:
        assert result["metrics"][key] == pytest.approx(summary["final"][key], rel=1e-5), key

    exported = tmp_path / "model.pt2"
    code, output = invoke("export", "--checkpoint", straight, "--format", "exported-program", "--output", exported)
    assert code == 0 and f"task {task}" in output, output
    program = torch.export.load(str(exported)).module()
    from trainer_core.exporting import example_inputs, exportable
    from trainer_core.trained import load_trained

    trained = load_trained(straight)
    batch = example_inputs(trained.data, 5)
    with torch.no_grad():
        assert torch.allclose(program(batch), exportable(trained)(batch), atol=1e-5)
    metadata = json.loads(zip_member(exported, "trainer.json"))
    assert metadata["task"] == task and metadata["output"] == load_task(task).export_doc

    # The weights alone as safetensors evaluate as their checkpoint does (the task's state, target scaling, included).
    weights = tmp_path / "model.safetensors"
    code, output = invoke("export", "--checkpoint", straight / "checkpoints" / "last.pt", "--format", "safetensors",
                          "--output", weights)
    assert code == 0, output
    code, output = invoke("eval", "--checkpoint", weights, "--json")
    assert code == 0, output
    assert json.loads(output)["metrics"] == pytest.approx(result["metrics"], rel=1e-6)


def zip_member(path: Path, suffix: str) -> str:
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith(suffix))).decode()


@pytest.fixture(scope="module")
def diabetes_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("diabetes") / "run"
    code, output = invoke("run", *JOBS["regression"], *COMMON, "--epochs", "4", "--run-dir", run)
    assert code == 0, output
    return run


def test_regression_predictions_are_in_the_targets_units(diabetes_run: Path, tmp_path: Path) -> None:
    from trainer_core_plugins.datasets.tabular import diabetes_split

    _, _, x_val, y_val = diabetes_split()
    rows = tmp_path / "patients.csv"
    rows.write_text("age,sex,bmi,bp,s1,s2,s3,s4,s5,s6\n" + "\n".join(",".join(map(str, x)) for x in x_val[:20]) + "\n")
    code, output = invoke("predict", "--checkpoint", diabetes_run, rows, "--json")
    assert code == 0, output
    values = [r["predictions"][0]["value"] for r in json.loads(output)]
    assert [r["input"] for r in json.loads(output)][:2] == [f"{rows}:2", f"{rows}:3"]
    # Disease progression is 25..346: predictions in those units, and better than the mean.
    mean_error = sum(abs(v - y) for v, y in zip(values, y_val[:20])) / 20
    spread = sum(abs(y - y_val.mean()) for y in y_val[:20]) / 20
    assert 25 < min(values) and max(values) < 346 and mean_error < spread
    code, output = invoke("predict", "--checkpoint", diabetes_run, tmp_path / "missing.csv")
    assert code == 2 and output.count("\n") == 1 and "does not exist" in output
    rows.write_text("1,2,3\n")
    code, output = invoke("predict", "--checkpoint", diabetes_run, rows)
    assert code == 2 and output.count("\n") == 1 and "expected 10 comma-separated numbers" in output


def test_a_language_model_predicts_and_generates_text(tmp_path: Path) -> None:
    run = tmp_path / "lm"
    job = [*JOBS["language-model"], *COMMON]
    assert invoke("run", *job, "--epochs", "2", "--run-dir", run)[0] == 0
    code, output = invoke("predict", "--checkpoint", run, "the ", "-k", "3", "--json")
    assert code == 0, output
    (result,) = json.loads(output)
    assert result["prompt"] == "the " and len(result["next"]) == 3
    assert sum(p["probability"] for p in result["next"]) <= 1
    code, first = invoke("generate", "--checkpoint", run, "--prompt", "The ", "-n", "40", "--seed", "5")
    assert code == 0, first
    assert first.startswith("The ") and len(first.rstrip("\n")) == 44
    assert invoke("generate", "--checkpoint", run, "--prompt", "The ", "-n", "40", "--seed", "5")[1] == first
    greedy = invoke("generate", "--checkpoint", run, "--prompt", "The ", "-n", "40", "--temperature", "0", "--seed", "1")[1]
    assert greedy == invoke("generate", "--checkpoint", run, "--prompt", "The ", "-n", "40", "--temperature", "0",
                            "--seed", "2")[1]
    code, output = invoke("generate", "--checkpoint", run, "--prompt", "\u2603")
    assert code == 2 and "not in the model's vocabulary" in output and output.count("\n") == 1


def test_generate_refuses_a_model_that_is_not_a_language_model(diabetes_run: Path) -> None:
    code, output = invoke("generate", "--checkpoint", diabetes_run)
    assert code == 2 and output.count("\n") == 1
    assert "generate needs a language model" in output and "task 'regression'" in output


def test_runs_shows_each_runs_headline_metric(diabetes_run: Path) -> None:
    code, output = invoke("runs", diabetes_run)
    assert code == 0, output
    assert "best headline metric" in output.splitlines()[0] and "val/r2 " in output.splitlines()[1]


# -- mistakes -------------------------------------------------------------------


def test_a_dataset_for_another_task_is_refused_before_the_run_folder(tmp_path: Path) -> None:
    code, output = invoke("run", *JOBS["regression"], "--task", "classification", "--run-dir", tmp_path / "run")
    assert code == 2 and output.count("\n") == 1, output
    assert output.startswith("error: task 'classification' cannot train on dataset 'diabetes': its train targets are "
                             "float32 values")
    assert output.rstrip().endswith("dataset 'diabetes' is for task 'regression': use --task regression")
    assert not (tmp_path / "run").exists()


def test_class_accuracy_on_a_regression_run_fails_before_training(tmp_path: Path) -> None:
    code, output = invoke("run", *JOBS["regression"], "--plugins", "class-accuracy", "--run-dir", tmp_path / "run")
    assert code == 2 and output.count("\n") == 1, output
    assert "class-accuracy is for the classification task, but this run's task is 'regression'" in output
    assert not (tmp_path / "run").exists()  # refused before training: the folder this start made is gone again


def test_an_image_model_on_feature_vectors_is_one_line(tmp_path: Path) -> None:
    code, output = invoke("run", "--dataset", "diabetes", "--run-dir", tmp_path / "run")
    assert code == 2 and output.count("\n") == 1
    assert "smallcnn needs images" in output and "--model mlp" in output


def test_trainer_tasks_lists_every_task_with_its_metrics_and_options() -> None:
    code, output = invoke("tasks")
    assert code == 0, output
    for name in ("classification", "regression", "multilabel", "language-model"):
        assert f"\n{name}  (trainer-core)" in f"\n{output}"
    assert "metrics: val/loss, val/mse, val/mae, val/r2 (headline: val/r2)" in output
    assert "loss: mse|l1|huber = 'mse'" in output


def test_tensorboard_follows_the_task(diabetes_run: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing import event_accumulator

    for task in ("regression", "multilabel"):
        run = tmp_path / task
        code, output = invoke("run", *JOBS[task], *COMMON, "--epochs", "1", "--run-dir", run, "--plugins", "tensorboard")
        assert code == 0, output
        events = event_accumulator.EventAccumulator(str(run), size_guidance={"tensors": 0})
        events.Reload()
        scalars, tensors = set(events.Tags()["scalars"]), set(events.Tags()["tensors"])
        assert set(load_task(task).modes) <= scalars  # every metric of the task
        assert not events.Tags()["images"]  # feature vectors are not images
        pr = {t for t in tensors if t.startswith("pr/")}
        assert pr == ({f"pr/label{i}" for i in range(5)} if task == "multilabel" else set())
    code, output = invoke("run", *JOBS["regression"], "--plugins", "tensorboard", "-o", "tensorboard.train_accuracy=true",
                          "--run-dir", tmp_path / "acc")
    assert code == 2 and "tensorboard.train_accuracy is for the classification task" in output


# -- a third party's task --------------------------------------------------------

def documented_task() -> str:
    """The example task of docs/tasks.md, as written there."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "tasks.md").read_text()
    return next(block for block in text.split("```python\n")[1:] if "class Counts(Task)" in block).split("```")[0]


COUNTS_DATA = '''
import torch

from trainer_core import DataBundle, TensorSplit


def load(size: int = 256):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(size, 4, generator=gen)
    y = torch.poisson((0.5 * x[:, 0] + 0.3 * x[:, 1]).exp(), generator=gen)
    cut = size * 3 // 4
    return DataBundle(TensorSplit(x[:cut], y[:cut]), TensorSplit(x[cut:], y[cut:]), ["count"], (4,), task="counts")
'''


def test_the_documented_third_party_task_trains_from_an_entry_point(fake_entry_points, tmp_path: Path) -> None:
    fake_entry_points("trainer-counts", {"trainer.tasks": {"counts": "counts_task:Counts"},
                                        "trainer.datasets": {"counts": "counts_data:load"}},
                      modules={"counts_task": documented_task(), "counts_data": COUNTS_DATA})
    run = tmp_path / "run"
    code, output = invoke("run", "--dataset", "counts", "--model", "mlp", "--epochs", "6", "--lr", "0.01", "--quiet",
                          "--plugins", "checkpoint,early-stopping", "--run-dir", run)
    assert code == 0, output
    history = metrics_lines(run)
    assert history[-1]["val/deviance"] < history[0]["val/deviance"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "counts" and "val/deviance" in summary["best"]
    # checkpoint ranked by the task's headline, lower being better as the task says.
    best = min(history, key=lambda m: m["val/deviance"])
    assert (run / "checkpoints" / f"best-epoch{best['epoch']:03d}-val_deviance{best['val/deviance']:.4f}.pt").is_file()
    code, output = invoke("tasks")
    assert "counts  (trainer-counts)" in output and "(headline: val/deviance)" in output


def test_a_task_object_passed_to_the_trainer_is_used() -> None:
    data = run_tiny(fit=False).data
    task = load_task("classification", {"label_smoothing": 0.1})
    trainer = run_tiny(model=tiny_model(), data=data, fit=False)
    assert trainer.task.name == "classification" and trainer.task.label_smoothing == 0.0
    from trainer_core.trainer import Trainer

    custom = Trainer(tiny_model(), data, trainer.config, task=task)
    assert custom.task is task


# -- several processes --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("task", ["regression", "multilabel", "language-model"])
def test_two_processes_train_each_task_as_one_does(task: str, tmp_path: Path) -> None:
    job = [*JOBS[task], *COMMON, "--epochs", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert invoke("run", *job, "--run-dir", one)[0] == 0
    env = {k: v for k, v in os.environ.items() if k != "TRAINER_DEBUG"}
    done = subprocess.run([sys.executable, "-m", "trainer_core", "run", *job, "--run-dir", str(two), "--nproc-per-node", "2"],
                          capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr
    for a, b in zip(metrics_lines(one), metrics_lines(two), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
