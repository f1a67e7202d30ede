"""The mlflow plugin (issue 16, item 1), against the real mlflow package: runs read back
through MlflowClient from the default SQLite store, and once from a real `mlflow server`."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("mlflow", reason="the mlflow extra is not installed: pip install -e '.[mlflow]'")
from click.testing import CliRunner  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from trainer_core import RunConfig, hookimpl, read_safetensors  # noqa: E402
from trainer_core.checkpointing import load_checkpoint  # noqa: E402
from trainer_core.cli import make_cli  # noqa: E402
from trainer_core.distributed import is_rank_zero_only  # noqa: E402
from trainer_core.runner import build_run  # noqa: E402
from trainer_core_plugins.mlflow import MLflow  # noqa: E402

RUN = ["--dataset", "digits", "-o", "model.width=8", "-q", "--plugins", "mlflow,checkpoint"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One runs root for the module: its SQLite store is created once (creating one takes seconds)."""
    return tmp_path_factory.mktemp("mlflow") / "runs"


def invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(make_cli(), [str(a) for a in args])
    return result.exit_code, result.output


def client_for(runs: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{runs.resolve() / 'mlflow.db'}")


def mlflow_run(client: MlflowClient, name: str):  # noqa: ANN201
    experiment = client.get_experiment_by_name("trainer-core")
    found = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert len(found) == 1, [r.info.run_name for r in found]
    return found[0]


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_a_run_is_logged_whole(runs: Path, tmp_path: Path) -> None:
    code, output = invoke("run", *RUN, "--epochs", "2", "--runs-root", runs, "--name", "whole", "--log-every", "10")
    assert code == 0, output
    folder, client = runs / "whole", client_for(runs)
    run = mlflow_run(client, "whole")
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert (tags["model"], tags["dataset"], tags["task"], tags["status"]) == ("smallcnn", "digits", "classification",
                                                                              "completed")
    assert tags["run_folder"] == str(folder.resolve())
    # params: the resolved config, flattened
    config = tomllib.loads((folder / "config.toml").read_text())
    assert run.data.params["lr"] == str(config["lr"]) and run.data.params["model.width"] == "8"
    assert run.data.params["model.name"] == "smallcnn" and run.data.params["epochs"] == "2"
    # every evaluation's metrics at its step, as metrics.jsonl has them
    evaluations = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for key in ("val/acc", "val/loss"):
        assert history(client, run.info.run_id, key) == [(e["step"], e[key]) for e in evaluations]
    assert history(client, run.info.run_id, "train/loss_epoch") == [(e["step"], e["train/loss"]) for e in evaluations]
    # every training-log interval: 45 steps an epoch, a log every 10 and at each epoch's end
    steps = [s for s, _ in history(client, run.info.run_id, "train/loss")]
    assert steps == [10, 20, 30, 40, 45, 55, 65, 75, 85, 90]
    assert [s for s, _ in history(client, run.info.run_id, "lr")] == steps
    # artifacts: summary.json and config.toml as the run folder has them, the best checkpoint's weights
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"summary.json", "config.toml", "model.safetensors"}
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path)))
    assert json.loads((local / "summary.json").read_text()) == json.loads((folder / "summary.json").read_text())
    assert tomllib.loads((local / "config.toml").read_text()) == config
    (best,) = (folder / "checkpoints").glob("best-*.pt")
    saved = load_checkpoint(best)["model"]
    found = read_safetensors(local / "model.safetensors")
    assert found.weights.keys() == saved.keys() and all((found.weights[k] == v).all() for k, v in saved.items())
    assert found.info["model"] == "smallcnn" and found.info["epoch"] == load_checkpoint(best)["state"]["epoch"]
    code, output = invoke("eval", "--checkpoint", local / "model.safetensors", "--json")
    assert code == 0 and json.loads(output)["metrics"]["val/acc"] == pytest.approx(max(e["val/acc"] for e in evaluations))


def test_a_resumed_run_continues_its_mlflow_run(runs: Path) -> None:
    code, output = invoke("run", *RUN, "--epochs", "1", "--runs-root", runs, "--name", "resumed")
    assert code == 0, output
    client = client_for(runs)
    first = mlflow_run(client, "resumed")
    assert first.info.status == "FINISHED"
    code, output = invoke("run", *RUN, "--epochs", "3", "--resume", runs / "resumed")
    assert code == 0, output
    run = mlflow_run(client, "resumed")  # still one MLflow run of that name
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    assert [s for s, _ in history(client, run.info.run_id, "val/acc")] == [45, 90, 135]
    assert run.data.params["epochs"] == "1"  # MLflow keeps a param's first value (a warning names it)


class Failing:
    """Ends the run at its third training step: by an exception, a second Ctrl-C, or a real SIGTERM."""

    def __init__(self, how: str) -> None:
        self.how = how

    @hookimpl
    def on_batch_end(self, trainer, batch_idx: int) -> None:  # noqa: ANN001
        if batch_idx == 2:
            if self.how == "error":
                raise RuntimeError("sensor offline")
            if self.how == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's own handler: stop after this step


@pytest.mark.parametrize(("how", "status", "ended"), [("error", "failed", "FAILED"), ("ctrl-c", "interrupted", "KILLED"),
                                                       ("sigterm", "stopped", "KILLED")])
def test_a_run_that_ends_early_ends_its_mlflow_run_to_match(runs: Path, how: str, status: str, ended: str) -> None:
    name = f"ended-{how}"
    config = RunConfig(dataset="digits", epochs=2, device="cpu", model_options={"width": 8}, plugins={"mlflow": {}},
                       runs_root=str(runs), name=name, log_every_n_steps=1)
    trainer = build_run(config)
    trainer.pm.register(Failing(how), "failing")
    if how == "sigterm":
        trainer.fit()
    else:
        with pytest.raises(BaseException):
            trainer.fit()
    run = mlflow_run(client_for(runs), name)
    assert (run.info.status, run.data.tags["status"]) == (ended, status)
    assert [s for s, _ in history(client_for(runs), run.info.run_id, "train/loss")][:2] == [1, 2]  # logged before it ended
    assert json.loads((runs / name / "summary.json").read_text())["status"] == status


class Breaker:
    """Turns the SQLite store into garbage mid-run, as a tracking server that goes away."""

    def __init__(self, store: Path) -> None:
        self.store = store

    @hookimpl
    def on_batch_end(self, trainer) -> None:  # noqa: ANN001
        if trainer.state.step == 5:
            self.store.write_bytes(b"not a database " * 1000)


def test_a_store_that_fails_mid_run_costs_warnings_not_the_run(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    config = RunConfig(dataset="digits", epochs=1, device="cpu", model_options={"width": 8}, plugins={"mlflow": {}},
                       runs_root=str(runs), name="broken", log_every_n_steps=1)
    trainer = build_run(config)
    trainer.pm.register(Breaker(runs / "mlflow.db"), "breaker")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("trainer_core").addHandler(handler)
    try:
        trainer.fit()
    finally:
        logging.getLogger("trainer_core").removeHandler(handler)
    assert json.loads((runs / "broken" / "summary.json").read_text())["status"] == "completed"
    messages = [r.getMessage() for r in records]
    assert any("values not sent" in m and "wait for the next flush" in m for m in messages), messages
    assert any("plugin 'mlflow' failed in on_run_end" in m for m in messages), messages


def test_rank_zero_only_and_nothing_per_training_step() -> None:
    assert is_rank_zero_only(MLflow)
    assert not {"on_batch_start", "on_before_backward", "on_before_optimizer_step", "on_batch_end"} & set(dir(MLflow))


def test_bad_options_and_a_missing_package_are_one_line_errors(tmp_path: Path) -> None:
    code, output = invoke("run", *RUN, "-o", "mlflow.flush_secs=0", "--run-dir", tmp_path / "run")
    assert code == 2 and "mlflow.flush_secs must be >= 1" in output and not (tmp_path / "run").exists()
    # A Python without mlflow: a module of that name that fails to import, as a missing one does.
    (tmp_path / "nomlflow").mkdir()
    (tmp_path / "nomlflow" / "mlflow.py").write_text("raise ModuleNotFoundError(\"No module named 'mlflow'\")\n")
    done = subprocess.run([sys.executable, "-m", "trainer_core", "run", *RUN, "--run-dir", str(tmp_path / "run2")],
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "nomlflow")}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "pip install 'trainer-core[mlflow]'" in lines[0] and not (tmp_path / "run2").exists()


def test_the_default_store_cannot_send_the_artifacts_elsewhere(tmp_path: Path) -> None:
    # A store copied or written by someone else names where its experiment keeps artifacts.
    runs, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    runs.mkdir()
    client_for(runs).create_experiment("trainer-core", artifact_location=elsewhere.as_uri())
    code, output = invoke("run", *RUN, "--epochs", "1", "--runs-root", runs, "--name", "r")
    assert code == 2 and output.startswith("error: mlflow: experiment 'trainer-core' in sqlite:") and output.count("\n") == 1
    assert "keeps its artifacts at file://" in output and "-o mlflow.experiment=NAME" in output
    assert not elsewhere.exists() and not (runs / "r").exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_a_real_mlflow_server_receives_the_run(tmp_path: Path) -> None:
    """MLFLOW_TRACKING_URI pointing at a real `mlflow server` on 127.0.0.1."""
    port = free_port()
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
               "--artifacts-destination", str(tmp_path / "served-artifacts")]
    server = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"mlflow server could not start here: {server.stderr.read().decode()[-300:] if server.poll() is not None else 'no answer in 180 s'}")
            time.sleep(1)
        done = subprocess.run([sys.executable, "-m", "trainer_core", "run", *RUN, "--epochs", "1", "--run-dir",
                               str(tmp_path / "served")], env={**os.environ, "MLFLOW_TRACKING_URI": uri}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert not (tmp_path / "mlflow.db").exists()  # the server's store, not the default
        client = MlflowClient(tracking_uri=uri)
        run = mlflow_run(client, "served")
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "completed"
        evaluation = json.loads((tmp_path / "served" / "metrics.jsonl").read_text().splitlines()[0])
        assert history(client, run.info.run_id, "val/acc") == [(evaluation["step"], evaluation["val/acc"])]
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"summary.json", "config.toml", "model.safetensors"}
        assert any((tmp_path / "served-artifacts").rglob("model.safetensors"))  # uploaded through the server
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
