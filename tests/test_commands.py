"""trainer eval / predict / export / runs on a real checkpoint of a real (small) digits run."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from trainer_core import RunConfig
from trainer_core.cli import make_cli
from trainer_core.runner import build_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A two-epoch digits run (a narrow smallcnn) with its checkpoint in its run folder."""
    root = tmp_path_factory.mktemp("trained")
    config = RunConfig(dataset="digits", epochs=2, plugins={}, device="cpu", run_dir=str(root / "run"),
                       model_options={"width": 8})
    trainer = build_run(config)
    trainer.fit()
    checkpoint = root / "run" / "checkpoints" / "last.pt"
    trainer.save_checkpoint(checkpoint)
    summary = json.loads((root / "run" / "summary.json").read_text())
    return {"root": root, "run": root / "run", "checkpoint": checkpoint, "trainer": trainer, "summary": summary}


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(make_cli(), [str(a) for a in args])
    return result.exit_code, result.output


def one_line_error(code: int, output: str, *fragments: str) -> None:
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    for fragment in fragments:
        assert fragment in lines[0], output


# -- eval -------------------------------------------------------------------------


def test_eval_matches_the_runs_own_final_evaluation(trained: dict) -> None:
    code, output = invoke("eval", "--checkpoint", trained["checkpoint"], "--json")
    assert code == 0, output
    result = json.loads(output)
    final = trained["summary"]["final"]
    assert result["accuracy"] == pytest.approx(final["val/acc"])
    assert result["loss"] == pytest.approx(final["val/loss"], rel=1e-6)
    assert (result["model"], result["dataset"], result["split"], result["epoch"]) == ("smallcnn", "digits", "val", 2)
    assert result["samples"] == 360 and sum(c["total"] for c in result["classes"].values()) == 360
    correct = sum(c["correct"] for c in result["classes"].values())
    assert correct == round(final["val/acc"] * 360)
    assert torch.tensor(result["confusion_matrix"]).diagonal().sum().item() == correct


def test_eval_text_shows_loss_accuracy_and_the_class_table(trained: dict) -> None:
    code, output = invoke("eval", "--checkpoint", trained["run"])  # a run folder: its newest checkpoint
    assert code == 0, output
    assert f"accuracy {100 * trained['summary']['final']['val/acc']:.2f} %" in output
    rows = [line.split() for line in output.splitlines() if line.split() and line.split()[0] in list("0123456789")]
    assert [r[0] for r in rows] == list("0123456789")
    assert sum(int(r[2]) for r in rows) == 360


@pytest.mark.slow
def test_eval_on_the_training_split(trained: dict) -> None:
    code, output = invoke("eval", "--checkpoint", trained["checkpoint"], "--split", "train", "--json")
    assert code == 0, output
    assert json.loads(output)["samples"] == 1437


def test_eval_errors_are_one_line(trained: dict, tmp_path: Path) -> None:
    one_line_error(*invoke("eval", "--checkpoint", tmp_path / "missing.pt"), "does not exist")
    (tmp_path / "empty-run").mkdir()
    one_line_error(*invoke("eval", "--checkpoint", tmp_path / "empty-run"), "no checkpoint file in this folder")
    torch.save(trained["trainer"].model.state_dict(), tmp_path / "bare.pt")
    one_line_error(*invoke("eval", "--checkpoint", tmp_path / "bare.pt"), "no saved run config")
    # fake has 3 classes: the 10-class head does not fit.
    one_line_error(*invoke("eval", "--checkpoint", trained["checkpoint"], "--dataset", "fake"), "do not fit", "3 classes")
    one_line_error(*invoke("eval", "--checkpoint", trained["checkpoint"], "--dataset", "digitz"), "did you mean 'digits'")


# -- predict ----------------------------------------------------------------------


def write_digit_images(folder: Path, count: int) -> tuple[list[Path], torch.Tensor]:
    """The first validation digits as 8x8 grayscale PNG files, and their tensors."""
    from trainer_core_plugins.datasets.digits import load

    inputs = load().val.inputs[:count]
    paths = []
    for index, image in enumerate(inputs):
        path = folder / f"digit{index}.png"
        Image.fromarray((image[0] * 255).round().byte().numpy(), "L").save(path)
        paths.append(path)
    return paths, inputs


def model_probabilities(trainer, inputs: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    mean, std = trainer.data.mean[0], trainer.data.std[0]
    with torch.no_grad():
        trainer.model.eval()
        return torch.softmax(trainer.model((inputs - mean) / std), dim=1)


def test_predict_gives_the_models_probabilities_for_image_files(trained: dict, tmp_path: Path) -> None:
    paths, inputs = write_digit_images(tmp_path, 6)
    code, output = invoke("predict", "--checkpoint", trained["checkpoint"], *paths, "--top-k", "3", "--json")
    assert code == 0, output
    results = json.loads(output)
    expected = model_probabilities(trained["trainer"], inputs)
    assert [r["image"] for r in results] == [str(p) for p in paths]
    for result, probabilities in zip(results, expected):
        top = result["predictions"]
        assert len(top) == 3
        assert [p["probability"] for p in top] == sorted((p["probability"] for p in top), reverse=True)
        assert top[0]["index"] == int(probabilities.argmax())
        assert top[0]["class"] == str(top[0]["index"])
        # PNG files hold 8-bit pixels: the only difference from the dataset's tensors is rounding.
        for p in top:
            assert p["probability"] == pytest.approx(float(probabilities[p["index"]]), abs=0.02)


def test_predict_text_output_and_top_k_above_the_class_count(trained: dict, tmp_path: Path) -> None:
    paths, _ = write_digit_images(tmp_path, 1)
    code, output = invoke("predict", "--checkpoint", trained["checkpoint"], paths[0], "-k", "50")
    assert code == 0, output
    lines = output.splitlines()
    assert lines[0] == str(paths[0]) and len(lines) == 11  # every one of the 10 classes
    assert lines[1].lstrip().startswith("1. ") and lines[1].endswith("%")


def test_predict_resizes_and_converts_colour_images(trained: dict, tmp_path: Path) -> None:
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "photo.jpg")
    code, output = invoke("predict", "--checkpoint", trained["checkpoint"], tmp_path / "photo.jpg", "--json")
    assert code == 0, output
    assert sum(p["probability"] for p in json.loads(output)[0]["predictions"]) <= 1.0 + 1e-6


def test_predict_errors_are_one_line(trained: dict, tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("not an image")
    one_line_error(*invoke("predict", "--checkpoint", trained["checkpoint"], tmp_path / "notes.png"), "notes.png is not an image")
    one_line_error(*invoke("predict", "--checkpoint", trained["checkpoint"], tmp_path / "gone.png"), "gone.png does not exist")
    one_line_error(*invoke("predict", "--checkpoint", trained["checkpoint"], tmp_path / "notes.png", "-k", "0"), "--top-k must be >= 1")


# -- export -----------------------------------------------------------------------

# Runs in a separate interpreter where importing our packages fails: the file must stand alone.
LOADER = textwrap.dedent("""
    import json, sys
    sys.modules["trainer_core"] = None
    sys.modules["plugins"] = None
    import torch
    fmt, model_file, inputs_file, out_file = sys.argv[1:]
    extra = {"trainer.json": ""}
    if fmt == "torchscript":
        model = torch.jit.load(model_file, _extra_files=extra)
    else:
        model = torch.export.load(model_file, extra_files=extra).module()
    inputs = torch.load(inputs_file)
    with torch.no_grad():
        torch.save({"logits": model(inputs), "one": model(inputs[:1])}, out_file)
    print(json.loads(extra["trainer.json"])["classes"])
""")


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "suffix"), [("torchscript", ".ts"), ("exported-program", ".pt2")])
def test_export_loads_with_plain_torch_and_gives_the_same_outputs(trained: dict, tmp_path: Path, fmt: str, suffix: str) -> None:
    output = tmp_path / f"model{suffix}"
    code, text = invoke("export", "--checkpoint", trained["checkpoint"], "--format", fmt, "--output", output)
    assert code == 0, text
    assert text.startswith(f"wrote {output} ({fmt}) from {trained['checkpoint']}")
    from trainer_core_plugins.datasets.digits import load

    inputs = load().val.inputs[:7]  # in [0, 1]: the exported model normalises itself
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "loader.py").write_text(LOADER)
    done = subprocess.run(
        [sys.executable, str(tmp_path / "loader.py"), fmt, str(output), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(list("0123456789"))
    got = torch.load(tmp_path / "out.pt")
    trainer = trained["trainer"]
    mean, std = trainer.data.mean[0], trainer.data.std[0]
    with torch.no_grad():
        expected = trainer.model.eval()((inputs - mean) / std)
    assert torch.allclose(got["logits"], expected, atol=1e-5)
    assert torch.allclose(got["one"], expected[:1], atol=1e-5)  # any batch size


def test_export_errors(trained: dict, tmp_path: Path) -> None:
    one_line_error(*invoke("export", "--checkpoint", trained["checkpoint"], "--format", "torchscript", "--output", tmp_path),
                   "is a folder")
    code, output = invoke("export", "--checkpoint", trained["checkpoint"], "--format", "pickle", "--output", tmp_path / "m")
    assert code == 2 and "'pickle' is not one of" in output


def test_export_never_leaves_a_partial_file(trained: dict, tmp_path: Path) -> None:
    output = tmp_path / "model.pt2"
    output.write_bytes(b"previous export")
    code, _ = invoke("export", "--checkpoint", tmp_path / "missing.pt", "--format", "exported-program", "--output", output)
    assert code == 2 and output.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"]


# -- runs -------------------------------------------------------------------------


def test_runs_lists_finished_incomplete_and_running_runs(trained: dict, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    finished = runs / "finished"
    build_run(RunConfig(dataset="fake", epochs=2, plugins={}, device="cpu", run_dir=str(finished))).fit()
    killed = runs / "killed"
    killed.mkdir()
    (killed / "config.toml").write_text('[model]\nname = "mlp"\n[dataset]\nname = "mnist"\n')
    (killed / "metrics.jsonl").write_text('{"epoch": 1, "step": 10, "val/acc": 0.5, "val/loss": 1.5}\n'
                                          '{"epoch": 2, "step": 20, "val/acc": 0.75, "val/loss": 1.2}\n{"epoch": 3, "st')
    running = runs / "running"
    running.mkdir()
    (running / "config.toml").write_text('[model]\nname = "smallcnn"\n[dataset]\nname = "digits"\n')
    from trainer_core.rundir import RunDir

    held = RunDir.create(running, resume=True)  # a live run holds its folder's lock
    (runs / "not-a-run").mkdir()

    code, output = invoke("runs", runs, "--json")
    held.close()
    assert code == 0, output
    rows = {r["name"]: r for r in json.loads(output)}
    assert set(rows) == {"finished", "killed", "running"}
    summary = json.loads((finished / "summary.json").read_text())
    assert rows["finished"]["status"] == "completed"
    assert rows["finished"]["best"] == summary["best"]["val/acc"]["value"]
    assert rows["finished"]["duration_s"] == summary["duration_s"]
    assert (rows["finished"]["model"], rows["finished"]["dataset"], rows["finished"]["epochs"]) == ("smallcnn", "fake", 2)
    assert (rows["killed"]["status"], rows["killed"]["best"], rows["killed"]["best_epoch"]) == ("incomplete", 0.75, 2)
    assert (rows["running"]["status"], rows["running"]["best"]) == ("running", None)

    # A finished run taken again by a live one (--overwrite, --resume) is running: its old summary is the last session's.
    replacing = RunDir.create(finished, overwrite=True)
    code, output = invoke("runs", runs, "--json")
    replacing.close()
    again = {r["name"]: r for r in json.loads(output)}["finished"]
    assert (again["status"], again["duration_s"]) == ("running", None), again

    code, output = invoke("runs", runs, "--metric", "val/loss")
    assert code == 0, output
    header, *lines = output.splitlines()
    assert header.split()[:6] == ["name", "date", "model", "dataset", "epochs", "best"] and "val/loss" in header
    killed_line = next(line for line in lines if line.startswith("killed"))
    assert "1.2000 (epoch 2)" in killed_line and killed_line.rstrip().endswith("incomplete")


def test_runs_dates_a_run_by_its_first_start(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "run"
    job = ["run", "--dataset", "fake", "--epochs", "1", "-q", "--plugins", "checkpoint", "--run-dir", run]
    assert invoke(*job)[0] == 0
    first = json.loads((run / "summary.json").read_text())["started"]
    assert invoke(*job[:-2], "--epochs", "2", "--run-dir", run, "--resume", "auto")[0] == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["started"] == first  # the resume keeps the first start
    os.utime(run / "config.toml", (0, 0))  # copied, or edited: the file's time says nothing
    code, output = invoke("runs", tmp_path / "runs", "--json")
    assert code == 0, output
    started = datetime.datetime.fromisoformat(first).timestamp()
    assert json.loads(output)[0]["date"] == time.strftime("%Y-%m-%d %H:%M", time.localtime(started))


def test_runs_on_one_run_folder_and_errors(trained: dict, tmp_path: Path) -> None:
    code, output = invoke("runs", trained["run"])
    assert code == 0 and output.splitlines()[1].startswith("run ")
    code, output = invoke("runs", tmp_path)
    assert code == 0 and output.strip() == f"no runs in {tmp_path}"
    # The fix names trainer runs' own argument, not a trainer run option (issue 15).
    code, output = invoke("runs", tmp_path / "nowhere")
    one_line_error(code, output, "is not a folder", "trainer runs FOLDER")
    assert not output.startswith(f"error: {tmp_path / 'nowhere'} is not a folder; runs are written under --runs-root")


# -- the real program ------------------------------------------------------------


@pytest.mark.slow
def test_commands_in_a_real_subprocess(trained: dict) -> None:
    done = subprocess.run([sys.executable, "-m", "trainer_core", "eval", "--checkpoint", str(trained["checkpoint"])],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"accuracy {100 * trained['summary']['final']['val/acc']:.2f} %" in done.stdout
    done = subprocess.run([sys.executable, "-m", "trainer_core", "predict", "--checkpoint", str(trained["root"] / "nope.pt"), "x.png"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().startswith("error: checkpoint") and "\n" not in done.stderr.strip()


@pytest.mark.slow
def test_eval_of_a_run_with_loader_processes_exits_when_done(tmp_path: Path) -> None:
    # Loader processes ignore stop signals (the trainer acts on them), so the trainer must end
    # them itself; a command that leaves its loader running would wait for it forever at exit.
    from test_datasets import write_image_tree

    write_image_tree(tmp_path / "images", per_class=4, size=(12, 12))
    run = [sys.executable, "-m", "trainer_core", "run", "--dataset", "imagefolder", "--data-root", str(tmp_path / "images"),
           "-o", "dataset.image_size=8", "--model", "mlp", "--num-workers", "2", "--epochs", "1", "-q",
           "--plugins", "checkpoint", "--run-dir", str(tmp_path / "run")]
    assert subprocess.run(run, capture_output=True, text=True, timeout=120).returncode == 0
    done = subprocess.run([sys.executable, "-m", "trainer_core", "eval", "--checkpoint", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "accuracy" in done.stdout


def test_the_cli_stays_light_to_import() -> None:
    code = "import sys, trainer_core.cli as c; c.make_cli(); print(sorted(m for m in ('torch', 'PIL', 'numpy') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="the onnx package is not installed")
def test_export_onnx_when_the_onnx_package_is_installed(trained: dict, tmp_path: Path) -> None:
    import onnx
    from onnx.reference import ReferenceEvaluator

    output = tmp_path / "model.onnx"
    code, text = invoke("export", "--checkpoint", trained["checkpoint"], "--format", "onnx", "--output", output)
    assert code == 0, text
    document = onnx.load(str(output))
    assert json.loads({p.key: p.value for p in document.metadata_props}["trainer.json"])["classes"] == list("0123456789")
    from trainer_core_plugins.datasets.digits import load

    inputs = load().val.inputs[:5]
    got = ReferenceEvaluator(document).run(None, {"images": inputs.numpy()})[0]
    trainer = trained["trainer"]
    with torch.no_grad():
        expected = trainer.model.eval()((inputs - trainer.data.mean[0]) / trainer.data.std[0])
    assert torch.allclose(torch.from_numpy(got), expected, atol=1e-4)


def test_shell_completion_is_offered_by_click() -> None:
    env = {**os.environ, "_TRAINER_COMPLETE": "bash_source"}
    script = subprocess.run([sys.executable, "-m", "trainer_core"], capture_output=True, text=True, timeout=60, env=env)
    assert script.returncode == 0 and "_trainer_completion()" in script.stdout
    env.update({"_TRAINER_COMPLETE": "bash_complete", "COMP_WORDS": "trainer ex", "COMP_CWORD": "1"})
    words = subprocess.run([sys.executable, "-m", "trainer_core"], capture_output=True, text=True, timeout=60, env=env)
    assert words.stdout.split() == ["plain,export"]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the very mistake this test makes on purpose
def test_export_refuses_a_file_that_does_not_reproduce_the_model(trained: dict, tmp_path: Path) -> None:
    from torch import nn

    from trainer_core.exporting import export_model
    from trainer_core.trained import Trained
    from trainer_core.errors import UsageError

    class BatchDependent(nn.Module):
        """Python control flow on the batch size: tracing bakes in the example's branch."""

        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.linear(x.flatten(1))
            return out if x.shape[0] <= 2 else -out

    base = trained["trainer"]
    model = BatchDependent()
    candidate = Trained(trained["checkpoint"], {}, base.config, base.data, model, base.task)
    output = tmp_path / "model.ts"
    output.write_bytes(b"previous export")
    with pytest.raises(UsageError, match="differ from the model's.*nothing was written"):
        export_model(candidate, "torchscript", output)
    assert output.read_bytes() == b"previous export"


def test_predict_prepares_files_with_the_datasets_own_validation_transforms(tmp_path: Path) -> None:
    """An image-folder run: predict on a validation file must give exactly what evaluation saw."""
    for split, count in (("train", 6), ("val", 3)):
        for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                shade = tuple(max(0, c - 25 * index) for c in colour)
                Image.new("RGB", (12 + index, 10), shade).save(folder / f"{index}.png")
    config = RunConfig(dataset="imagefolder", data_root=str(tmp_path / "data"), epochs=2, batch_size=4, plugins={},
                       device="cpu", run_dir=str(tmp_path / "run"), model_options={"width": 4},
                       dataset_options={"image_size": 8, "augment": False})
    trainer = build_run(config)
    trainer.fit()
    trainer.save_checkpoint(tmp_path / "run" / "last.pt")
    trainer.model.eval()
    with torch.no_grad():
        expected = torch.cat([torch.softmax(trainer.model(x), dim=1) for x, _ in trainer.val_batches.iterate()])
    files = [Path(path) for path, _ in trainer.data.val.samples]
    code, output = invoke("predict", "--checkpoint", tmp_path / "run" / "last.pt", *files, "--json", "-k", "2")
    assert code == 0, output
    for result, probabilities in zip(json.loads(output), expected):
        got = {p["class"]: p["probability"] for p in result["predictions"]}
        assert got == pytest.approx({name: float(p) for name, p in zip(trainer.data.classes, probabilities)}, abs=1e-6)

    # The data moved: the saved data_root no longer holds it, --data-root says where it is now.
    (tmp_path / "data").rename(tmp_path / "moved")
    code, output = invoke("eval", "--checkpoint", tmp_path / "run" / "last.pt")
    assert code == 2 and len(output.strip().splitlines()) == 1, output
    code, output = invoke("export", "--checkpoint", tmp_path / "run" / "last.pt", "--data-root", tmp_path / "moved",
                          "--format", "torchscript", "--output", tmp_path / "model.ts")
    assert code == 0 and (tmp_path / "model.ts").is_file(), output


def test_eval_does_not_need_the_initial_weights_a_run_started_from(tmp_path: Path) -> None:
    from trainer_core_plugins.models.mlp import build

    torch.save(build((1, 8, 8), 3, hidden=8).state_dict(), tmp_path / "init.pt")
    config = RunConfig(model="mlp", dataset="fake", epochs=1, plugins={}, device="cpu", run_dir=str(tmp_path / "run"),
                       model_options={"hidden": 8, "weights": str(tmp_path / "init.pt")})
    trainer = build_run(config)
    trainer.fit()
    trainer.save_checkpoint(tmp_path / "last.pt")
    (tmp_path / "init.pt").unlink()  # moved or deleted since: the checkpoint has every weight
    code, output = invoke("eval", "--checkpoint", tmp_path / "last.pt", "--json")
    assert code == 0, output
    assert json.loads(output)["accuracy"] == pytest.approx(trainer.state.metrics["val/acc"])
