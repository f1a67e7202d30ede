"""class-accuracy: the confusion matrix against a brute-force count, the
metrics in metrics.jsonl/summary.json, the table, the saved matrix, state."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from trainer_core_plugins.class_accuracy import ClassAccuracy
from trainer_core import UsageError, metric_keys
from trainer_core.checkpointing import load_checkpoint
from trainer_core.cli import make_cli
from trainer_core.testing import HookRecorder, run_tiny, tiny_data, tiny_model
from trainer_core.trainer import Trainer


def brute_force_confusion(trainer: Trainer) -> list[list[int]]:
    """One sample at a time, the way the seed counted."""
    classes = trainer.data.num_classes
    matrix = [[0] * classes for _ in range(classes)]
    trainer.model.eval()
    with torch.no_grad():
        for inputs, targets in trainer.val_batches.iterate():
            predictions = trainer.model(inputs).argmax(dim=1)
            for target, prediction in zip(targets.tolist(), predictions.tolist()):
                matrix[target][prediction] += 1
    return matrix


def noisy_run(tmp_path: Path, plugin: ClassAccuracy, **settings: object) -> Trainer:
    # Noisy data, one short epoch: the matrix has errors off the diagonal; 23
    # validation samples in batches of 5 end with a partial batch of 3.
    data = tiny_data(num_classes=4, train_size=20, val_size=23, seed=3)
    data.train.inputs += 2.0 * torch.randn_like(data.train.inputs)
    data.val.inputs += 2.0 * torch.randn_like(data.val.inputs)
    return run_tiny({"class-accuracy": plugin}, data=data, run_dir=tmp_path / "run", epochs=1,
                    batch_size=5, lr=0.01, **settings)


def test_matrix_matches_brute_force_with_partial_last_batch(tmp_path: Path) -> None:
    plugin = ClassAccuracy()
    plugin.stream = io.StringIO()
    trainer = noisy_run(tmp_path, plugin)
    assert trainer.val_batches.size % trainer.config.batch_size != 0
    expected = brute_force_confusion(trainer)
    assert plugin.confusion is not None
    assert plugin.confusion.tolist() == expected
    assert sum(sum(row) for row in expected) == 23
    assert any(expected[i][j] for i in range(4) for j in range(4) if i != j), "test data should produce errors"
    for index in range(4):
        total = sum(expected[index])
        assert trainer.state.metrics[f"val/acc/class{index}"] == pytest.approx(expected[index][index] / total)


def test_metrics_reach_metrics_jsonl_and_summary(tmp_path: Path) -> None:
    plugin = ClassAccuracy(table=False)
    trainer = run_tiny({"class-accuracy": plugin}, run_dir=tmp_path / "run", epochs=2)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        assert {f"val/acc/class{i}" for i in range(3)} <= record.keys()
    final = json.loads((tmp_path / "run" / "summary.json").read_text())["final"]
    assert final == records[-1]
    assert final["val/acc/class1"] == trainer.state.metrics["val/acc/class1"]


def test_hooks_in_isolation_count_every_sample(tmp_path: Path) -> None:
    trainer = run_tiny(fit=False)
    plugin = ClassAccuracy()
    plugin.on_fit_start(trainer=trainer)
    plugin.on_eval_start(trainer=trainer)
    generator = torch.Generator().manual_seed(0)
    all_targets, all_predictions = [], []
    for size in (7, 7, 2):  # a partial last batch
        targets = torch.randint(0, 3, (size,), generator=generator)
        outputs = torch.randn(size, 3, generator=generator)
        plugin.on_eval_batch(targets=targets, outputs=outputs)
        all_targets += targets.tolist()
        all_predictions += outputs.argmax(dim=1).tolist()
    metrics = plugin.collect_eval_metrics(trainer=trainer)
    expected = torch.zeros(3, 3, dtype=torch.int64)
    for target, prediction in zip(all_targets, all_predictions):
        expected[target, prediction] += 1
    assert torch.equal(plugin.confusion, expected)
    assert metrics == {
        f"val/acc/class{i}": expected[i, i].item() / expected[i].sum().item() for i in range(3) if expected[i].sum()
    }


def test_table_is_aligned_with_counts(tmp_path: Path) -> None:
    plugin = ClassAccuracy()
    plugin.stream = io.StringIO()
    noisy_run(tmp_path, plugin)
    matrix = plugin.confusion
    lines = plugin.stream.getvalue().splitlines()
    assert lines[0] == "per-class accuracy (epoch 1):"
    assert lines[1].split() == ["class", "correct", "total", "accuracy"]
    rows = [line for line in lines[2:] if not line.startswith("-")]
    assert len(rows) == 5
    for index, row in enumerate(rows[:4]):
        correct, total = matrix[index, index].item(), matrix[index].sum().item()
        assert row.split() == [f"class{index}", str(correct), str(total), f"{100 * correct / total:.2f}", "%"]
    correct, total = matrix.diagonal().sum().item(), matrix.sum().item()
    assert rows[4].split() == ["all", str(correct), str(total), f"{100 * correct / total:.2f}", "%"]
    # Aligned: every data row is as wide as the header, and the numbers end in the same columns.
    assert len({len(row) for row in rows}) == 1
    assert len(lines[1]) <= len(rows[0])


def test_table_marks_classes_without_validation_samples(tmp_path: Path) -> None:
    plugin = ClassAccuracy()
    plugin.stream = io.StringIO()
    # Two validation samples for three classes: class2 has none.
    trainer = run_tiny({"class-accuracy": plugin}, data=tiny_data(val_size=2), epochs=1)
    assert "val/acc/class2" not in trainer.state.metrics
    assert {"val/acc/class0", "val/acc/class1"} <= trainer.state.metrics.keys()
    row = next(line for line in plugin.stream.getvalue().splitlines() if line.startswith("class2"))
    assert row.split() == ["class2", "0", "0", "n/a"]


def test_no_table_when_disabled_or_not_main(tmp_path: Path) -> None:
    quiet = ClassAccuracy(table=False)
    quiet.stream = io.StringIO()
    run_tiny({"class-accuracy": quiet}, epochs=1)
    assert quiet.stream.getvalue() == "" and quiet.confusion is not None

    other_rank = ClassAccuracy()
    other_rank.stream = io.StringIO()
    trainer = run_tiny({"class-accuracy": other_rank}, run_dir=tmp_path / "run", epochs=1, fit=False)
    trainer.rank = 1
    trainer.fit()
    assert other_rank.stream.getvalue() == ""
    assert not (tmp_path / "run" / "confusion_matrix.json").exists()


def test_confusion_matrix_file(tmp_path: Path) -> None:
    plugin = ClassAccuracy()
    plugin.stream = io.StringIO()
    trainer = noisy_run(tmp_path, plugin)
    saved = json.loads((tmp_path / "run" / "confusion_matrix.json").read_text())
    assert saved["classes"] == ["class0", "class1", "class2", "class3"]
    assert saved["matrix"] == plugin.confusion.tolist()
    assert (saved["epoch"], saved["step"]) == (1, trainer.state.step)
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


def test_class_names_become_safe_unique_keys(tmp_path: Path) -> None:
    assert metric_keys(["T-shirt/top", "Ankle boot", "", "a b", "a/b", "7"]) == [
        "T-shirt_top", "Ankle_boot", "class2", "a_b", "a_b_4", "7"
    ]
    data = tiny_data()
    data.classes = ["cat/dog", "bird  ", "fish"]
    plugin = ClassAccuracy(prefix="val/class_acc")
    plugin.stream = io.StringIO()
    trainer = run_tiny({"class-accuracy": plugin}, data=data, epochs=1)
    assert {"val/class_acc/cat_dog", "val/class_acc/bird", "val/class_acc/fish"} <= trainer.state.metrics.keys()
    assert "cat/dog" in plugin.stream.getvalue()  # the table keeps the real names


def test_state_travels_in_checkpoints(tmp_path: Path) -> None:
    plugin = ClassAccuracy(table=False)
    trainer = noisy_run(tmp_path, plugin)
    trainer.save_checkpoint(tmp_path / "last.pt")
    payload = load_checkpoint(tmp_path / "last.pt")  # weights_only
    assert torch.equal(payload["plugins"]["class-accuracy"]["confusion"], plugin.confusion)

    # Resuming a finished run evaluates nothing more; the restored matrix still gives the table.
    restored = ClassAccuracy()
    restored.stream = io.StringIO()
    resumed = Trainer(trainer.model, trainer.data, trainer.config, plugins={"class-accuracy": restored}, resume=payload)
    resumed.fit()
    assert torch.equal(restored.confusion, plugin.confusion)
    assert restored.evaluated_at == plugin.evaluated_at
    assert restored.stream.getvalue().startswith("per-class accuracy (epoch 1):")

    wrong = ClassAccuracy()
    wrong.on_fit_start(trainer=run_tiny(fit=False))  # three classes, the checkpoint has four
    with pytest.raises(UsageError, match="4, 4.*3 classes"):
        wrong.load_plugin_state(state=payload["plugins"]["class-accuracy"])


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("class-accuracy.matrix_file=../m.json", "class-accuracy.matrix_file must be a file name without folders"),
        ("class-accuracy.prefix=val/acc/", "class-accuracy.prefix must be a name like 'val/acc'"),
        ("class-accuracy.table=maybe", "option class-accuracy.table='maybe' is not a valid bool"),
    ],
)
def test_bad_options_are_one_line_usage_errors(tmp_path: Path, option: str, message: str) -> None:
    result = CliRunner().invoke(make_cli(), ["run", "--dataset", "fake", "--epochs", "1", "--plugins", "class-accuracy",
                                             "-o", option, "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()



def test_model_with_the_wrong_number_of_outputs_is_a_usage_error() -> None:
    # Five scores for three classes would silently count predictions 3 and 4 in the wrong cells.
    with pytest.raises(UsageError, match="class-accuracy: the model gives 5 scores per sample but the dataset has 3 classes"):
        run_tiny({"class-accuracy": ClassAccuracy()}, model=tiny_model(num_classes=5), epochs=1)


def test_a_dataset_without_class_names_is_refused_before_training() -> None:
    data = tiny_data()
    data.classes = []
    with pytest.raises(UsageError, match="task 'classification' cannot train on dataset 'tiny': the dataset names no classes"):
        run_tiny({"class-accuracy": ClassAccuracy()}, data=data, model=tiny_model(), epochs=1)


def test_another_task_is_refused_in_one_line_naming_it() -> None:
    data = tiny_data()
    data.task, data.classes = "regression", ["y"]
    data.train.targets, data.val.targets = data.train.targets.float(), data.val.targets.float()
    recorder = HookRecorder()
    with pytest.raises(UsageError, match="class-accuracy is for the classification task, but this run's task is 'regression'"):
        run_tiny({"class-accuracy": ClassAccuracy(), "recorder": recorder}, data=data, model=tiny_model(num_classes=1))
    assert "on_batch_start" not in recorder.names()  # refused before training
