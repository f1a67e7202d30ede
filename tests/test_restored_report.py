"""After the checkpoint plugin restores the best weights, what the run reports is
their evaluation, not the last epoch's (issue 18, item 5): summary.json's
``final`` (the last epoch's kept as ``last_epoch``), class-accuracy's table and
matrix file, TensorBoard's ``restored/`` scalars, PR curves and hparams; the
same after early-stopping restores its best weights."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from trainer_core import Trainer, hookimpl, load_checkpoint
from trainer_core.testing import run_tiny
from trainer_core_plugins.checkpoint import Checkpoint
from trainer_core_plugins.class_accuracy import ClassAccuracy
from trainer_core_plugins.early_stopping import EarlyStopping
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

    events = event_accumulator.EventAccumulator(str(run), size_guidance={"tensors": 0, "scalars": 0})
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

    hparams = plugin_event_accumulator.EventAccumulator(str(run))
    hparams.Reload()
    content = hparams.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert "restored/val/acc" in {info.name.tag for info in experiment.metric_infos}


def test_early_stoppings_restored_weights_are_what_the_run_reports(tmp_path: Path) -> None:
    table = ClassAccuracy()
    table.stream = io.StringIO()
    # min_delta larger than any accuracy change: only epoch 1 "improves", and the run stops at epoch 3.
    plugins = {"early-stopping": EarlyStopping(monitor="val/acc", min_delta=10.0, patience=2, restore_best_weights=True),
               "class-accuracy": table}
    trainer = run_tiny(plugins, run_dir=tmp_path / "run", epochs=10, lr=0.2)
    run = tmp_path / "run"
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in history] == [1, 2, 3]
    assert history[0]["val/loss"] != history[-1]["val/loss"]  # so the two reports differ
    summary = json.loads((run / "summary.json").read_text())
    assert summary["restored"] == {"epoch": 1, "step": history[0]["step"], "source": "early-stopping's weights of epoch 1"}
    assert summary["final"]["val/loss"] == pytest.approx(history[0]["val/loss"], rel=1e-5)
    assert summary["last_epoch"] == history[-1]
    assert trainer.state.metrics["val/loss"] == summary["final"]["val/loss"]
    assert "per-class accuracy (epoch 1, the restored best weights):" in table.stream.getvalue()


def test_a_cut_short_run_saves_its_trained_weights_before_early_stopping_restores(tmp_path: Path) -> None:
    class StopMidEpoch:
        @hookimpl
        def on_batch_end(self, trainer: Trainer, batch_idx: int) -> None:
            if trainer.state.epoch == 3 and batch_idx == 1:
                trainer.request_stop("stop mid-epoch")

    plugins = {"checkpoint": Checkpoint(restore_best=False),
               "early-stopping": EarlyStopping(monitor="val/acc", min_delta=10.0, patience=5, restore_best_weights=True),
               "stop": StopMidEpoch()}
    trained: dict[str, torch.Tensor] = {}

    class Snapshot:  # the weights training left, seen by the first on_fit_end of all
        @hookimpl(wrapper=True)
        def on_fit_end(self, trainer: Trainer) -> Any:
            trained.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
            return (yield)

    run_tiny({"snapshot": Snapshot(), **plugins}, run_dir=tmp_path / "run", epochs=10)
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (last["state"]["epoch"], last["state"]["batch_idx"]) == (3, 2)
    # last.pt, what --resume continues from, holds the trained weights, not early-stopping's epoch-1 ones.
    assert all(torch.equal(last["model"][k], v) for k, v in trained.items())
