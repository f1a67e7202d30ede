"""The ``trainer`` command, through click's runner and as a real subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from trainer_core.cli import make_cli
from trainer_core.entrypoints import PLUGINS

FAST = ["--dataset", "fake", "--epochs", "2", "--batch-size", "32", "--device", "cpu"]


def invoke(*args, cwd=None):
    return CliRunner().invoke(make_cli(), list(args), catch_exceptions=False)


def trainer_process(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "trainer_core", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_run_writes_a_run_folder(tmp_path):
    result = invoke("run", *FAST, "--run-dir", str(tmp_path / "run"), "--plugins", "progress", "-o", "progress.bar=off")
    assert result.exit_code == 0, result.output
    assert "epoch 2/2" in result.output and f"run folder: {tmp_path / 'run'}" in result.output
    # The trained model too: the checkpoint plugin is on by default (issue 15, item 1).
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"config.toml", "metrics.jsonl", "summary.json", "checkpoints"}
    assert {p.name for p in (tmp_path / "run" / "checkpoints").iterdir()} == {
        "last.pt", Path(json.loads((tmp_path / "run" / "summary.json").read_text())["checkpoints"]["best"]).name}


def test_quiet_prints_nothing(tmp_path):
    result = invoke("run", *FAST, "--run-dir", str(tmp_path / "run"), "--quiet")
    assert result.exit_code == 0 and result.output == ""


def test_unknown_plugin_is_one_line_and_exit_2(tmp_path):
    result = CliRunner().invoke(make_cli(), ["run", "--plugins", "nosuch", "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert result.output.startswith("error: unknown plugin 'nosuch'") and result.output.count("\n") == 1
    assert not (tmp_path / "r").exists()  # bad input leaves nothing behind


@pytest.mark.parametrize("args, message", [
    (["--model", "smalcnn"], "error: unknown model 'smalcnn' (did you mean 'smallcnn'?)"),
    (["--dataset", "digit"], "error: unknown dataset 'digit' (did you mean 'digits'?)"),
    (["-o", "model.widht=3"], "error: unknown option 'model.widht' (did you mean 'width'?)"),
    (["-o", "progress.bar=sometimes"], "error: option progress.bar='sometimes' is not a valid auto|on|off"),
    (["--lr", "-1"], "error: lr must be > 0 (got -1.0)"),
    (["--device", "cuda:7"], "error: device 'cuda:7' was asked for but CUDA is not available here"),
    (["--device", "toaster"], "error: device 'toaster' is not a device name"),
    (["--config", "missing.toml"], "error: config file missing.toml does not exist"),
    (["-o", "model.width=0"], "error: model 'smallcnn': width must be >= 1 (got 0)"),
    (["--data-root", "/tmp"], "error: dataset 'fake' takes no --data-root"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    result = CliRunner().invoke(make_cli(), ["run", *FAST, "--run-dir", str(tmp_path / "r"), *args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(message) and result.output.count("\n") == 1


def test_a_second_run_never_reuses_a_run_folder(tmp_path):
    run = str(tmp_path / "run")
    assert invoke("run", *FAST, "--run-dir", run, "-q").exit_code == 0
    first = (tmp_path / "run" / "summary.json").read_text()
    result = CliRunner().invoke(make_cli(), ["run", *FAST, "--run-dir", run, "-q"])
    assert result.exit_code == 2 and "already holds a run; pass --overwrite" in result.output
    assert (tmp_path / "run" / "summary.json").read_text() == first
    assert invoke("run", *FAST, "--run-dir", run, "-q", "--overwrite", "--epochs", "1").exit_code == 0
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_default_names_do_not_collide(tmp_path):
    for _ in range(2):
        assert invoke("run", *FAST, "--runs-root", str(tmp_path), "-q", "--epochs", "1").exit_code == 0
    assert len(list(tmp_path.iterdir())) == 2


def test_plugins_lists_hooks_options_and_shows_broken_rows(fake_entry_points):
    fake_entry_points("broken-dist", {PLUGINS: {"broken": "broken_plugin:Broken"}},
                      modules={"broken_plugin": "raise RuntimeError('half installed')\n"})
    result = invoke("plugins")
    assert result.exit_code == 0
    assert "progress  (trainer-core)  trainer_core_plugins.progress:Progress" in result.output
    assert "hooks: on_batch_end, on_eval, on_exception, on_fit_end, on_fit_start, on_train_log" in result.output
    assert "options: bar: auto|on|off = 'auto'; refresh_per_second: float = 10.0" in result.output
    assert "broken  (broken-dist)  broken_plugin:Broken" in result.output
    assert "error: plugin 'broken' failed to import" in result.output and "half installed" in result.output


def test_models_and_datasets_list_options_and_show_broken_rows(fake_entry_points):
    fake_entry_points("odd-dist", {"trainer.models": {"odd": "odd_model_module_that_does_not_exist:build"}})
    result = invoke("models")
    assert result.exit_code == 0
    assert "smallcnn  (trainer-core)  trainer_core_plugins.models.smallcnn:build" in result.output
    assert "    options: width: int = 32; dropout: float = 0.25; weights: str | none = None" in result.output
    assert "odd  (odd-dist)  odd_model_module_that_does_not_exist:build" in result.output
    assert "    error: model 'odd' failed to import" in result.output
    datasets = invoke("datasets").output
    assert "digits  (trainer-core)" in datasets and "    options: val_fraction: float = 0.2; split_seed: int = 0" in datasets
    assert "data_root" not in datasets  # what the trainer passes itself is no option


def test_version():
    from trainer_core import __version__

    assert invoke("--version").output.strip() == f"trainer, version {__version__}"


def test_subprocess_error_has_no_traceback_unless_debug(tmp_path):
    plain = trainer_process("run", "--plugins", "nosuch", cwd=tmp_path)
    assert plain.returncode == 2
    assert plain.stderr.startswith("error: unknown plugin 'nosuch'") and "Traceback" not in plain.stderr
    assert plain.stderr.count("\n") == 1
    debug = trainer_process("run", "--plugins", "nosuch", "--debug", cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    env_debug = trainer_process("run", "--plugins", "nosuch", cwd=tmp_path, env={"TRAINER_DEBUG": "1"})
    assert "Traceback" in env_debug.stderr


def test_subprocess_run_with_a_config_file(tmp_path):
    (tmp_path / "run.toml").write_text('epochs = 2\nbatch_size = 32\ndevice = "cpu"\n[dataset]\nname = "fake"\n'
                                       'num_classes = 4\n[plugins.progress]\nbar = "off"\n')
    result = trainer_process("run", "--config", "run.toml", "--name", "cfg", "--epochs", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "epoch 3/3" in result.stdout  # the command line overrides the file
    summary = json.loads((tmp_path / "runs" / "cfg" / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["status"] == "completed"


def test_plugin_failure_names_plugin_and_hook(fake_entry_points, tmp_path):
    folder = fake_entry_points("bad-dist", {PLUGINS: {"bad": "bad_plugin:Bad"}}, modules={"bad_plugin": """
        from trainer_core import hookimpl

        class Bad:
            @hookimpl
            def on_eval(self, metrics):
                raise KeyError("val/f1")
    """})
    result = trainer_process("run", *FAST, "--plugins", "bad", "-q", "--run-dir", "r", cwd=tmp_path,
                             env={"PYTHONPATH": str(folder)})
    assert result.returncode == 1
    assert result.stderr.strip() == "error: plugin 'bad' failed in on_eval: KeyError: 'val/f1'"
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "failed"


def test_help_does_not_import_torch():
    code = "import sys; from trainer_core.cli import make_cli; make_cli(); assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_listing_plugins_does_not_import_torch():
    code = ("import sys; from click.testing import CliRunner; from trainer_core.cli import make_cli; "
            "r = CliRunner().invoke(make_cli(), ['plugins']); assert r.exit_code == 0, r.output; "
            "assert 'error' not in r.output, r.output; assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_warnings_are_prefixed_lines_on_stderr(tmp_path):
    import torch

    from trainer_core_plugins.models.mlp import build

    torch.save(build((1, 8, 8), 10).state_dict(), tmp_path / "ten-classes.pt")
    result = trainer_process("run", *FAST, "-q", "--run-dir", "r", "--model", "mlp",
                             "-o", f"model.weights={tmp_path / 'ten-classes.pt'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("warning: weights from ") and "l2.weight" in line


@pytest.mark.parametrize("quiet", [False, True], ids=["default", "quiet"])
def test_quiet_silences_every_plugins_notices(tmp_path, quiet):
    notices = ["--plugins", "freeze,checkpoint,class-accuracy", "-o", "checkpoint.restore_best=true",
               "-o", "freeze.unfreeze_at_epoch=2"]
    result = invoke("run", *FAST, "--run-dir", str(tmp_path / "run"), *notices, *(["-q"] if quiet else []))
    assert result.exit_code == 0, result.output
    if quiet:
        assert result.output == ""
    else:
        for line in ["freeze: ", "freeze: epoch 2: training", "checkpoint: restored the best weights", "total"]:
            assert line in result.output
