"""``trainer sweep``: real Optuna, real SQLite studies, real trial runs on digits,
real processes (``--jobs``) and a real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer_core.errors import UsageError
from trainer_core.sweepspace import as_run_options, parse_dimension, parse_space

optuna = pytest.importorskip("optuna", reason="trainer sweep needs the 'sweep' extra")

# A tiny model, two short epochs, no checkpoint files unless a test wants them.
TINY = ["--model", "mlp", "-o", "model.hidden=16", "--epochs", "2", "--batch-size", "64", "--plugins", "no:checkpoint"]


def cli(*args: str | Path, cwd: Path) -> tuple[int, str, str]:
    from click.testing import CliRunner

    from trainer_core.cli import make_cli

    old = Path.cwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(make_cli(), [str(a) for a in args])
    finally:
        os.chdir(old)
    return result.exit_code, result.stdout, result.stderr


def load(folder: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'study.db'}")


# -- the search space -------------------------------------------------------------

def test_search_space_kinds_become_optuna_distributions() -> None:
    space = parse_space(["lr=log:1e-4:1e-1", "batch_size=choice:32,64,128", "model.width=int:16:128",
                         "dataset.augment=choice:true,false", "steplr.gamma=float:0.1:0.9"])
    d = {dim.name: dim.distribution() for dim in space}
    assert d["lr"] == optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)
    assert d["batch_size"] == optuna.distributions.CategoricalDistribution([32, 64, 128])  # numbers stay numbers
    assert d["model.width"] == optuna.distributions.IntDistribution(16, 128)
    assert d["dataset.augment"].choices == ("true", "false")
    assert d["steplr.gamma"] == optuna.distributions.FloatDistribution(0.1, 0.9)
    assert as_run_options({"lr": 0.01, "batch-size": 64, "model.width": 20, "steplr.gamma": 0.5}) == (
        {"lr": 0.01, "batch_size": 64}, ["model.width=20", "steplr.gamma=0.5"])


@pytest.mark.parametrize("spec, says", [
    ("lr", "is not of the form NAME=KIND:ARGS"),
    ("lr=1e-4:1e-1", "unknown kind '1e-4'; kinds: log:LOW:HIGH, float:LOW:HIGH, int:LOW:HIGH, choice:A,B,C"),
    ("lr=lg:1e-4:1e-1", "unknown kind 'lg' (did you mean 'log'?)"),
    ("lr=log:1e-4", "expected log:LOW:HIGH with two numbers"),
    ("lr=log:a:b", "expected log:LOW:HIGH with two numbers"),
    ("lr=log:0:1", "a log range needs LOW > 0"),
    ("lr=float:0.5:0.1", "LOW must be less than HIGH"),
    ("model.width=int:8.5:16", "int bounds must be whole numbers"),
    ("batch_size=choice:32,,64", "choices must be distinct and non-empty"),
    ("batch_size=choice:32,32", "choices must be distinct and non-empty"),
    ("runs_root=choice:a,b", "is where each trial writes"),
])
def test_a_bad_search_space_is_one_line_naming_it(spec: str, says: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_dimension(spec)
    assert says in str(caught.value) and f"-s {spec}" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("args, says", [
    ([], "a sweep needs a search space"),
    (["-s", "lr=log:1e-4:1e-1", "-s", "lr=float:0.1:0.2"], "'lr' is given twice"),
    (["-s", "lrr=log:1e-4:1e-1"], "unknown setting 'lrr'"),
    (["-s", "model.widht=int:8:16"], "unknown option 'model.widht'"),
    (["-s", "steplr.gamma=float:0.1:0.9"], "add --plugins steplr"),
    (["-s", "lr=log:1e-4:1e-1", "--metric", "val/acx"], "no evaluation produces 'val/acx' (did you mean 'val/acc'?)"),
    (["-s", "lr=log:1e-4:1e-1", "--storage", "not-a-url"], "--storage not-a-url: Optuna cannot open it"),
])
def test_a_sweep_that_cannot_run_is_refused_in_one_line_before_anything_is_written(
        tmp_path: Path, args: list[str], says: str) -> None:
    code, out, err = cli("sweep", *args, "--trials", "1", cwd=tmp_path)
    assert code == 2 and says in err and err.count("\n") == 1 and err.startswith("error: "), err
    assert not (tmp_path / "runs").exists()


def test_without_optuna_the_error_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # what Python does for a package that is not installed
    code, _, err = cli("sweep", "-s", "lr=log:1e-4:1e-1", cwd=tmp_path)
    assert (code, err) == (2, "error: trainer sweep needs Optuna: pip install 'trainer-core[sweep]'\n")


def test_trainer_help_lists_sweep(tmp_path: Path) -> None:
    code, out, _ = cli("--help", cwd=tmp_path)
    assert code == 0 and "sweep     Search hyperparameters with Optuna" in out
    code, out, _ = cli("sweep", "--help", cwd=tmp_path)
    # The run options a trial takes, shared with 'trainer run'; none of those the sweep chooses.
    assert all(o in out for o in ("--lr", "--batch-size", "--plugins", "--config", "-o, --option", "--jobs", "--storage"))
    assert not any(o in out for o in ("--resume", "--run-dir", "--overwrite", "--nproc-per-node"))


def test_a_resumed_sweep_must_search_what_it_searched(tmp_path: Path) -> None:
    code, out, err = cli("sweep", "--trials", "1", "-s", "lr=log:1e-3:1e-2", *TINY, "--epochs", "1", "--name", "s",
                         cwd=tmp_path)
    assert code == 0, err
    assert "trial 0 completed: val/acc" in out
    code, out, err = cli("sweep", "--trials", "2", "-s", "lr=log:1e-3:1e-2", *TINY, "--epochs", "2", "--name", "s",
                         cwd=tmp_path)
    assert code == 2 and "is a sweep with other settings (epochs: 1, here 2)" in err and err.count("\n") == 1
    assert len(load(tmp_path / "runs" / "s", "s").trials) == 1
    # A new study in that folder would number its trials from 0 again, into the first study's folders.
    code, out, err = cli("sweep", "--trials", "1", "-s", "lr=log:1e-3:1e-2", *TINY, "--epochs", "2", "--name", "s",
                         "--study", "other", cwd=tmp_path)
    assert code == 2 and err.count("\n") == 1 and "holds the trials of another study" in err and "give another --name" in err
    assert len(load(tmp_path / "runs" / "s", "s").trials) == 1


# -- sweeps that run --------------------------------------------------------------

def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.slow
def test_a_small_sweep_beats_a_bad_start_and_its_best_config_trains_the_same(tmp_path: Path) -> None:
    bad = [*TINY, "--lr", "1e-5", "--plugins", "checkpoint"]
    code, _, err = cli("run", *bad, "-q", "--name", "bad-start", cwd=tmp_path)
    assert code == 0, err
    start = summary(tmp_path / "runs" / "bad-start")["final"]["val/acc"]
    code, out, err = cli("sweep", "--trials", "4", "-s", "lr=log:1e-3:1e-1", "--pruner", "none", "--sampler-seed", "0",
                         *bad, "--name", "lr", cwd=tmp_path)
    assert code == 0, err
    folder = tmp_path / "runs" / "lr"
    study = load(folder, "lr")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    assert study.best_value > start + 0.3, (start, study.best_value)  # 1e-5 barely moves in two epochs
    assert f"best: trial {study.best_trial.number}, val/acc {study.best_value:.4g}" in out
    assert all(f"runs/lr/trial-000{n}" in out for n in range(4))  # the table names every trial's folder
    # Every trial is a normal run: its own folder, listed by 'trainer runs', evaluated by 'trainer eval'.
    code, out, _ = cli("runs", folder, cwd=tmp_path)
    assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == [f"trial-000{n}" for n in range(4)]
    best_run = folder / f"trial-{study.best_trial.number:04d}"
    code, out, err = cli("eval", "--checkpoint", best_run, "--json", cwd=tmp_path)
    assert code == 0 and json.loads(out)["metrics"]["val/acc"] == pytest.approx(study.best_value), err
    # The best settings as a config file: 'trainer run --config' trains the best trial again.
    config = folder / "best-config.toml"
    code, _, err = cli("run", "--config", config, "-q", "--name", "again", cwd=tmp_path)
    assert code == 0, err
    again = summary(tmp_path / "runs" / "again")
    assert again["best"]["val/acc"]["value"] == pytest.approx(study.best_value)


@pytest.mark.slow
def test_hopeless_trials_are_pruned_and_their_runs_say_so(tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "p"
    folder.mkdir(parents=True)
    # Optuna's own way to seed a study: two good learning rates, then a hopeless one.
    study = optuna.create_study(study_name="p", storage=f"sqlite:///{folder / 'study.db'}", direction="maximize")
    for lr in (0.01, 0.02, 1e-5):
        study.enqueue_trial({"lr": lr})
    code, out, err = cli("sweep", "--trials", "3", "-s", "lr=log:1e-5:1e-1", "--startup-trials", "2", *TINY,
                         "--name", "p", cwd=tmp_path)
    assert code == 0, err
    states = [t.state.name for t in load(folder, "p").trials]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert "trial 2 pruned: val/acc" in out and "(at epoch 1)" in out
    pruned = summary(folder / "trial-0002")
    assert (pruned["status"], pruned["epochs"]) == ("pruned", 1)
    assert pruned["stop_reason"].startswith("pruned by the sweep at epoch 1 (val/acc ")
    assert summary(folder / "trial-0000")["status"] == "completed"
    code, out, _ = cli("runs", folder, cwd=tmp_path)
    assert [line.split()[-1] for line in out.splitlines()[1:]] == ["completed", "completed", "pruned"]


def sweep_process(cwd: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "trainer_core", "sweep", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_jobs_share_one_study_without_repeating_a_trial_number(tmp_path: Path) -> None:
    # A module in the working directory that a spawned worker would import in place of the standard library's.
    (tmp_path / "pickle.py").write_text(f"open({str(tmp_path / 'imported-pickle')!r}, 'w').close()\n")
    proc = sweep_process(tmp_path, "--jobs", "2", "--trials", "4", "-s", "lr=log:1e-3:1e-1", *TINY, "--name", "j")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert not (tmp_path / "imported-pickle").exists()
    trials = load(tmp_path / "runs" / "j", "j").trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state.name == "COMPLETE" for t in trials)
    pids = {t.user_attrs["pid"] for t in trials}
    assert proc.pid not in pids and 1 <= len(pids) <= 2  # run by the worker processes, not the sweep's own
    assert sorted(p.name for p in (tmp_path / "runs" / "j").glob("trial-*")) == [f"trial-000{n}" for n in range(4)]
    assert sorted(line.split()[1] for line in out.splitlines() if line.startswith("trial ") and "completed" in line) \
        == ["0", "1", "2", "3"]


def second_trial_under_way(tmp_path: Path, name: str, *args: str) -> subprocess.Popen[str]:
    """A sweep in a subprocess, once trial 0 has finished and trial 1 has evaluated its first epoch
    (of 20: it is still running when the test stops the sweep)."""
    proc = sweep_process(tmp_path, "--trials", "3", "-s", "lr=log:1e-3:1e-1", *TINY, "--epochs", "20", "--name", name)
    metrics = tmp_path / "runs" / name / "trial-0001" / "metrics.jsonl"
    deadline = time.monotonic() + 600  # a sweep that hangs fails the test instead of blocking CI
    while proc.poll() is None and not (metrics.exists() and metrics.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.2)
    if time.monotonic() >= deadline:
        proc.kill()
        proc.wait()
    assert proc.poll() is None, f"the sweep ended before its second trial was under way: {proc.communicate()}"
    return proc


@pytest.mark.slow
def test_a_killed_sweep_resumes_with_the_same_command(tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "k"
    proc = second_trial_under_way(tmp_path, "k")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = load(folder, "k").trials[1]
    assert killed.state.name == "RUNNING"  # as Optuna leaves a trial whose process died
    first = (folder / "trial-0000" / "summary.json").read_bytes()

    again = sweep_process(tmp_path, "--trials", "3", "-s", "lr=log:1e-3:1e-1", *TINY, "--epochs", "20", "--name", "k")
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert "trial 1 was left running by a process that is gone" in out
    trials = load(folder, "k").trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]  # nothing lost or repeated
    assert trials[2].params == killed.params and trials[2].user_attrs["retry_of"] == 1  # the killed values first
    assert (folder / "trial-0000" / "summary.json").read_bytes() == first  # a finished trial is left as it was


@pytest.mark.slow
def test_ctrl_c_stops_the_running_trial_and_queues_its_values_again(tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "c"
    proc = second_trial_under_way(tmp_path, "c")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130
    assert "trial 1 interrupted" in out and "trial  state" in out  # the table, as at the end of a sweep
    assert [t.state.name for t in load(folder, "c").trials] == ["COMPLETE", "FAIL", "WAITING"]  # (WAITING: queued)
    stopped = summary(folder / "trial-0001")
    assert (stopped["status"], stopped["stop_reason"]) == ("stopped", "received SIGINT")
    # Two finished trials are enough now: the one more the sweep runs is the interrupted trial's values.
    again = sweep_process(tmp_path, "--trials", "2", "-s", "lr=log:1e-3:1e-1", *TINY, "--epochs", "20", "--name", "c")
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    trials = load(folder, "c").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2].params == trials[1].params and trials[2].user_attrs["retry_of"] == 1
