"""Reliability and safety: a run survives a SIGKILL, a kill during a save, a full
disk, a signal, a NaN and a failing plugin without losing what it had, and no
file it loads can run code.  Real subprocesses, real files, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from plugins.checkpoint import Checkpoint
from plugins.steplr import StepLR
from trainer_core import RunConfig, Trainer, hookimpl, load_checkpoint
from trainer_core.checkpointing import find_checkpoint
from trainer_core.rundir import RunDir
from trainer_core.runtime import seed_everything
from trainer_core.testing import tiny_data, tiny_model


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- in process: a signal during evaluation ---------------------------------------------


def fit_tiny(run_dir: Path, extra: dict[str, object], resume: bool = False) -> Trainer:
    """A 3-epoch tiny run (3 steps per epoch) with steplr and checkpoint, fresh or resumed."""
    config = RunConfig(epochs=3, batch_size=16, lr=0.05, device="cpu", plugins={}, model="tiny", dataset="tiny")
    seed_everything(config.seed)
    payload = load_checkpoint(find_checkpoint(run_dir)) if resume else None
    plugins = {"checkpoint": Checkpoint(restore_best=False), "steplr": StepLR(step_size=1, gamma=0.5), **extra}
    trainer = Trainer(tiny_model(), tiny_data(), config, plugins=plugins,
                      run_dir=RunDir.create(run_dir, resume=resume, overwrite=not resume), resume=payload)
    trainer.fit()
    return trainer


class SignalDuringEval:
    """Sends this process SIGTERM from inside epoch 2's evaluation."""

    @hookimpl
    def on_eval_batch(self, trainer: Trainer) -> None:
        if trainer.state.epoch == 2:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_during_evaluation_is_honoured_and_the_epoch_is_evaluated_on_resume(tmp_path: Path) -> None:
    reference = fit_tiny(tmp_path / "straight", {})
    stopped = fit_tiny(tmp_path / "run", {"signal": SignalDuringEval()})
    assert stopped.signals.exit_code == 143 and stopped.state.stop_reason == "received SIGTERM"
    # The evaluation was cut short: nothing recorded for epoch 2, but its training is kept.
    assert [m["epoch"] for m in stopped.state.history] == [1]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["state"]["step"] == 6
    resumed = fit_tiny(tmp_path / "run", {}, resume=True)
    # The resumed run evaluates epoch 2 and runs its epoch-end hooks (steplr's step) before epoch 3.
    assert same_weights(reference.model.state_dict(), resumed.model.state_dict())
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == (tmp_path / "straight" / "metrics.jsonl").read_text()
