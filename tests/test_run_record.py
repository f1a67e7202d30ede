"""What a run folder records (issue 15): a command refused for its options leaves no folder, even
when the refusal comes at the first evaluation (item 3); the duration covers every session (item 6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from trainer_core.checkpointing import load_checkpoint
from trainer_core.cli import make_cli

FAST = ("--dataset", "fake", "--device", "cpu", "--epochs", "1", "-q")


def cli(*args: object, cwd: Path) -> tuple[int, str, str]:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        result = CliRunner().invoke(make_cli(), [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


# -- item 3 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("monitor", ["early-stopping.monitor", "checkpoint.monitor"])
def test_a_monitor_refused_at_the_first_evaluation_leaves_no_run_folder(tmp_path: Path, monitor: str) -> None:
    # class-accuracy adds metrics, so which metrics exist is known only at the first evaluation.
    plugins = "class-accuracy,early-stopping"
    code, out, err = cli("run", *FAST, "--plugins", plugins, "-o", f"{monitor}=val/bad", "--name", "job", cwd=tmp_path)
    assert (code, out) == (2, "") and err.startswith(f"error: {monitor}: no evaluation produces 'val/bad' (did you mean")
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # nor the runs root it made
    code, out, err = cli("run", *FAST, "--plugins", plugins, "-o", f"{monitor}=val/acc", "--name", "job", cwd=tmp_path)
    assert code == 0, out + err
    code, out, _ = cli("runs", "--json", cwd=tmp_path)
    assert code == 0 and [(r["name"], r["status"]) for r in json.loads(out)] == [("job", "completed")]


FUSSY = '''
from trainer_core import UsageError, hookimpl

class Fussy:
    @hookimpl
    def on_eval(self, trainer, metrics):
        if trainer.state.epoch == 2:
            raise UsageError("fussy: epoch 2 is not to my taste")
'''


def test_a_usage_error_after_an_epoch_was_kept_keeps_the_run(tmp_path: Path, fake_entry_points) -> None:  # noqa: ANN001
    fake_entry_points("fussy-dist", {"trainer.plugins": {"fussy": "fussy_plugin:Fussy"}}, modules={"fussy_plugin": FUSSY})
    code, _, err = cli("run", *FAST, "--epochs", "3", "--plugins", "fussy", "--run-dir", "run", cwd=tmp_path)
    assert code == 2 and "epoch 2 is not to my taste" in err
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["epoch"] == 1  # what --resume continues from


# -- item 6 ---------------------------------------------------------------------------------------


def test_the_duration_covers_every_session_of_a_resumed_run(tmp_path: Path) -> None:
    job = ("run", *FAST, "--epochs", "2", "--name", "job")
    assert cli(*job, cwd=tmp_path)[0] == 0
    run = tmp_path / "runs" / "job"
    first = json.loads((run / "summary.json").read_text())
    assert first["duration_s"] == first["session_duration_s"] > 0  # one session: the same
    saved = load_checkpoint(run / "checkpoints" / "last.pt")["state"]["duration_seconds"]
    assert 0 < saved <= first["duration_s"]  # the run's time up to its last checkpoint
    # A resume that has nothing left to do: a session of its own, added to the run's time.
    assert cli(*job, "--resume", "auto", cwd=tmp_path)[0] == 0
    second = json.loads((run / "summary.json").read_text())
    assert second["duration_s"] == pytest.approx(saved + second["session_duration_s"], abs=2e-3)
    assert second["duration_s"] > second["session_duration_s"]
    code, out, _ = cli("runs", "--json", cwd=tmp_path)
    (row,) = json.loads(out)
    assert (row["duration_s"], row["session_duration_s"]) == (second["duration_s"], second["session_duration_s"])
