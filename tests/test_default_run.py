"""`trainer run` with no options: the offline default job on real digits, and the README's
first run followed by its "Using a trained model" commands on the folder it leaves."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from trainer_core.config import load_config

BIN = Path(sys.executable).parent
README = Path(__file__).resolve().parents[1] / "README.md"


def readme_first_run() -> list[str]:
    """The README's first command line ends with the first run: ``... && .venv/bin/trainer run``."""
    text = README.read_text(encoding="utf-8")
    block = text[text.index("**Train the default model**"):text.index("**Run the tests:**")]
    (line,) = [line.strip() for line in block.splitlines() if line.startswith("    ")]
    program, *args = shlex.split(line.split("&&")[-1])
    assert program == ".venv/bin/trainer", line
    return [str(BIN / "trainer"), *args]


def readme_using_a_trained_model(run: str) -> list[list[str]]:
    """The commands of the README's "Using a trained model" block that apply to a run of the default
    job (``runs/NAME``, and ``trainer runs``), as written: optional ``[...]`` parts included."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Using a trained model"):]
    block = section[:section.index("\n\n", section.index("\n    trainer"))]
    commands = []
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", line.strip())  # (no command of the block has a ' #' of its own)
        if line.startswith("trainer ") and ("runs/NAME" in line or line.startswith("trainer runs")):
            words = shlex.split(re.sub(r"\[([^\]]*)\]", r"\1", line).replace("runs/NAME", f"runs/{run}"))
            commands.append([str(BIN / "trainer"), *words[1:]])
    return commands


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """The README's first run, in a folder of its own."""
    folder = tmp_path_factory.mktemp("first-run")
    result = subprocess.run(readme_first_run(), cwd=folder, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    (run,) = (folder / "runs").iterdir()
    return result, run


@pytest.mark.slow
def test_default_run_reaches_97_percent_and_writes_its_folder(default_run):
    result, run = default_run
    assert readme_first_run()[1:] == ["run"]
    assert run.name.startswith("smallcnn-digits-")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["device"] == "cpu"
    assert summary["final"]["val/acc"] >= 0.97
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 16))
    assert load_config(run / "config.toml").dataset == "digits"
    # Not a terminal: plain lines, one per epoch, and the final result.
    lines = result.stdout.splitlines()
    assert lines[0].startswith("training smallcnn on digits: 1437 train / 360 validation samples")
    assert sum(line.startswith("epoch ") for line in lines) == 15 and "\r" not in result.stdout
    assert lines[-2].startswith("done in ") and lines[-1] == f"run folder: runs/{run.name}"
    # It leaves its trained model: the best checkpoint, which its summary names, and the last.
    best = summary["checkpoints"]["best"]
    assert summary["checkpoints"]["last"] == "checkpoints/last.pt" and (run / best).is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted([Path(best).name, "last.pt"])


@pytest.mark.slow
def test_the_readmes_using_a_trained_model_works_on_the_first_runs_folder(default_run):
    _, run = default_run
    cwd = run.parent.parent
    commands = readme_using_a_trained_model(run.name)
    verbs = [c[1] for c in commands]
    assert verbs.count("eval") == 2 and "predict" in verbs and verbs.count("export") >= 2 and "runs" in verbs, commands
    best = run / json.loads((run / "summary.json").read_text())["checkpoints"]["best"]
    for command in commands:
        for word in command:  # the README's example inputs: two of the run's own validation digits
            if word.endswith((".jpg", ".png")) and not (cwd / word).exists():
                from trainer_core_plugins.datasets.digits import load

                image = load().val.inputs[len(list(cwd.glob("*.jpg")))][0]
                Image.fromarray((image * 255).round().byte().numpy(), "L").save(cwd / word)
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (command, done.stderr)
        if command[1] == "runs":
            assert run.name in done.stdout and "completed" in done.stdout
        elif "--checkpoint" in command and command[command.index("--checkpoint") + 1] == f"runs/{run.name}":
            # A run folder: its best checkpoint, said on stderr.
            assert done.stderr == f"using runs/{run.name}/{best.relative_to(run)} (the run's best checkpoint, as its summary.json names it)\n", done.stderr
        if command[1] == "predict":
            images = [w for w in command if w.endswith(".jpg")]
            results = json.loads(done.stdout) if "--json" in command else None
            assert results is not None and [r["image"] for r in results] == images, done.stdout
            assert all(len(r["predictions"]) == int(command[command.index("--top-k") + 1]) for r in results)
        if command[1] == "export":
            output = cwd / command[command.index("--output") + 1]
            assert output.is_file() and done.stdout.startswith(f"wrote {output.name} ") and f"from {best.relative_to(cwd)}" in done.stdout
            if output.suffix in (".ts", ".pt2"):  # programs: they take 8x8 digits and give 10 logits
                model = torch.jit.load(output) if output.suffix == ".ts" else torch.export.load(output).module()
                assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_the_default_plugins_run_no_hook_during_training_steps():
    """Why keeping the model by default costs nothing per step: at their defaults, neither default plugin
    implements a hook the loop calls per batch (an unregistered hook is never called; BENCHMARKS.md has the timing)."""
    from trainer_core import RunConfig, make_plugin_manager
    from trainer_core.runner import load_plugins

    pm = make_plugin_manager()
    load_plugins(pm, RunConfig().plugins)
    assert sorted(name for name, _ in pm.list_name_plugin()) == ["checkpoint", "progress"]
    per_step = ["on_batch_start", "on_before_backward", "on_before_optimizer_step", "on_batch_end"]
    assert {name: [impl.plugin_name for impl in getattr(pm.hook, name).get_hookimpls()] for name in per_step} == \
        {name: [] for name in per_step}
