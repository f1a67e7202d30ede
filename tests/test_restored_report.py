"""After the checkpoint plugin restores the best weights, what the run reports is
their evaluation, not the last epoch's (issue 18, item 5): summary.json's
``final`` (the last epoch's kept as ``last_epoch``), class-accuracy's table and
matrix file, TensorBoard's ``restored/`` scalars, PR curves and hparams."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from trainer_core import load_checkpoint
from trainer_core.testing import run_tiny
from trainer_core_plugins.checkpoint import Checkpoint
from trainer_core_plugins.class_accuracy import ClassAccuracy
from trainer_core_plugins.tensorboard import TensorBoard


def test_a_restored_model_is_what_the_run_reports(tmp_path: Path) -> None:
    table = ClassAccuracy()
    table.stream = io.StringIO()
    # The highest validation loss ranks best: the first epoch's, while training goes on for three.
    plugins = {"checkpoint": Checkpoint(monitor="val/loss", mode="max"), "class-accuracy": table, "tensorboard": TensorBoard()}
    trainer = run_tiny(plugins, run_dir=tmp_path / "run", epochs=3, lr=0.2)
    run = tmp_path / "run"
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in history] == [1, 2, 3]  # the restored evaluation is no epoch
    best = max(history, key=lambda m: m["val/loss"])
    assert best["epoch"] < 3 and best["val/loss"] != history[-1]["val/loss"]  # so the two reports differ

    summary = json.loads((run / "summary.json").read_text())
    final, last = summary["final"], summary["last_epoch"]
    assert summary["restored"]["epoch"] == best["epoch"] and summary["restored"]["step"] == best["step"]
    assert final["epoch"] == best["epoch"] and final["val/loss"] == pytest.approx(best["val/loss"], rel=1e-5)
    assert {k: final[k] for k in best if k.startswith("val/acc")} == {k: best[k] for k in best if k.startswith("val/acc")}
    assert last == history[-1]
    # The model the run leaves is the best checkpoint's, and the final metrics are its evaluation.
    saved = load_checkpoint(next((run / "checkpoints").glob("best-*.pt")))["model"]
    assert all(torch.equal(saved[k], v) for k, v in trainer.model.state_dict().items())

    matrix = json.loads((run / "confusion_matrix.json").read_text())
    assert (matrix["epoch"], matrix["step"], matrix["restored"]) == (best["epoch"], best["step"], True)
    rows = torch.tensor(matrix["matrix"])
    assert (rows.diagonal() / rows.sum(1)).tolist() == pytest.approx([final[f"val/acc/class{i}"] for i in range(3)])
    text = table.stream.getvalue()
    assert f"per-class accuracy (epoch {best['epoch']}, the restored best weights):" in text

    events = event_accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    restored_loss = [(e.step, e.value) for e in events.Scalars("restored/val/loss")]
    assert restored_loss == [(history[-1]["step"], pytest.approx(final["val/loss"], rel=1e-5))]
    assert [e.value for e in events.Scalars("val/loss")] == pytest.approx([m["val/loss"] for m in history], rel=1e-5)
    pr_tags = [t for t in events.Tags()["tensors"] if t.startswith("restored/pr/")]
    assert sorted(pr_tags) == ["restored/pr/class0", "restored/pr/class1", "restored/pr/class2"]
    # The restored curves are the best epoch's, not the last one's (true positives at the lowest threshold).
    curves = {tag: {e.step: e.tensor_proto for e in events.Tensors(tag)} for tag in ("pr/class0", "restored/pr/class0")}
    restored_curve = tensor_util.make_ndarray(curves["restored/pr/class0"][history[-1]["step"]])
    best_curve = tensor_util.make_ndarray(curves["pr/class0"][best["step"]])
    assert (restored_curve == best_curve).all()

    hparams = plugin_event_accumulator.EventAccumulator(str(run / "tensorboard"))
    hparams.Reload()
    content = hparams.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert "restored/val/acc" in {info.name.tag for info in experiment.metric_infos}
