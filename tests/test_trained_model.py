"""Using a trained model (issue 15): which checkpoint of a run folder ``eval``/``predict``/``export``
take (items 2), and ``export`` of models whose inputs are not images (item 4)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from trainer_core.checkpointing import load_checkpoint
from trainer_core.cli import make_cli

TABULAR = '''
import torch
from torch import nn
from trainer_core import DataBundle, TensorSplit

def load(shape: str = "13", declared: str = "", seed: int = 0):
    """Learnable feature vectors (or matrices) of any shape; `declared`: another input_shape than the data's."""
    dims = tuple(int(d) for d in shape.split("x"))
    g = torch.Generator().manual_seed(seed)
    def split(n):
        y = torch.randint(0, 3, (n,), generator=g)
        x = torch.randn(n, *dims, generator=g) * 2 + 5 + y.view(-1, *[1] * len(dims)).float()
        return TensorSplit(x, y)
    train = split(96)
    per = train.inputs.transpose(0, 1).reshape(dims[0], -1)  # per feature (per row of a matrix), as Batches normalises
    declared_shape = tuple(int(d) for d in declared.split("x")) if declared else dims
    return DataBundle(train, split(32), ["a", "b", "c"], declared_shape, per.mean(1).tolist(), per.std(1).tolist())

def build(input_shape, num_classes, fixed: int = 0):
    """An MLP for any input shape; `fixed`: one that takes that many features whatever it is told."""
    features = fixed or int(torch.tensor(input_shape).prod())
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, num_classes))
'''


def cli(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(make_cli(), [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def tabular(fake_entry_points) -> None:  # noqa: ANN001
    fake_entry_points("tabular-kit", {"trainer.datasets": {"tabular": "tabular_kit:load"},
                                      "trainer.models": {"tabular-mlp": "tabular_kit:build"}}, modules={"tabular_kit": TABULAR})


def train(run: Path, *args: object) -> dict:
    code, out, err = cli("run", "--dataset", "tabular", "--model", "tabular-mlp", "--device", "cpu", "-q", "--run-dir", run,
                         *args)
    assert code == 0, out + err
    return json.loads((run / "summary.json").read_text())


# -- item 2: a run folder's best checkpoint, or --which last ------------------------------------


@pytest.fixture
def run_with_best_and_last(tabular, tmp_path: Path) -> tuple[Path, dict]:  # noqa: ANN001
    """A run whose best epoch is not its last: ranked by the highest training loss (mode max),
    so the first epoch is the best and the last differs from it."""
    run = tmp_path / "run"
    summary = train(run, "--epochs", "3", "--lr", "0.01", "-o", "checkpoint.monitor=train/loss",
                    "-o", "checkpoint.mode=max", "-o", "checkpoint.restore_best=false")
    return run, summary


def test_the_summary_names_the_best_and_last_checkpoints(run_with_best_and_last) -> None:  # noqa: ANN001
    run, summary = run_with_best_and_last
    assert summary["checkpoints"]["last"] == "checkpoints/last.pt"
    assert summary["checkpoints"]["best"].startswith("checkpoints/best-epoch001-train_loss")
    best = load_checkpoint(run / summary["checkpoints"]["best"])
    assert best["state"]["epoch"] == 1 and load_checkpoint(run / "checkpoints" / "last.pt")["state"]["epoch"] == 3


@pytest.mark.parametrize("command", ["eval", "predict", "export"])
def test_commands_take_the_best_checkpoint_of_a_run_folder_and_say_so(run_with_best_and_last, tmp_path: Path,
                                                                     command: str) -> None:
    run, summary = run_with_best_and_last
    best = run / summary["checkpoints"]["best"]
    rows = tmp_path / "rows.csv"
    rows.write_text(",".join(["5"] * 13) + "\n")
    extra = {"eval": ["--json"], "predict": [rows, "--json"], "export": ["--format", "torchscript", "--output", tmp_path / "m.ts"]}
    for which, expected, words in [(None, best, "the run's best checkpoint"), ("best", best, "the run's best checkpoint"),
                                   ("last", run / "checkpoints" / "last.pt", "the run's last checkpoint")]:
        chosen = ["--which", which] if which else []
        code, out, err = cli(command, "--checkpoint", run, *chosen, *extra[command])
        assert code == 0, out + err
        assert err.startswith(f"using {expected} ({words}"), err
        if command == "eval":
            assert json.loads(out)["checkpoint"] == str(expected)
            assert json.loads(out)["epoch"] == (1 if expected == best else 3)
        if command == "export":
            assert out.startswith(f"wrote {tmp_path / 'm.ts'} (torchscript) from {expected}:")


def test_which_is_for_run_folders_and_a_folder_without_a_named_best(run_with_best_and_last, tmp_path: Path) -> None:  # noqa: ANN001
    run, summary = run_with_best_and_last
    code, out, err = cli("eval", "--checkpoint", run / "checkpoints" / "last.pt", "--which", "best")
    assert (code, out) == (2, "") and err == (f"error: --which chooses a checkpoint of a run folder; {run / 'checkpoints' / 'last.pt'} "
                                              "is a file: leave --which out\n")
    # A summary that names no best (a killed run's folder has none): its only best-*.pt file.
    (run / "summary.json").unlink()
    code, _, err = cli("eval", "--checkpoint", run)
    assert code == 0 and err.startswith(f"using {run / summary['checkpoints']['best']} (the run's best checkpoint)")
    # Several, and nothing says which is best: refused, naming them.
    shutil.copy(run / summary["checkpoints"]["best"], run / "checkpoints" / "best-epoch002-train_loss9.0000.pt")
    code, out, err = cli("eval", "--checkpoint", run)
    assert code == 2 and "names no best checkpoint and the folder holds 2" in err and "--which last" in err


def test_a_summary_never_leads_outside_its_run_folder(run_with_best_and_last, tmp_path: Path) -> None:  # noqa: ANN001
    run, summary = run_with_best_and_last
    outside = tmp_path / "elsewhere.pt"
    shutil.copy(run / "checkpoints" / "last.pt", outside)
    for named in [str(outside), "../elsewhere.pt", "checkpoints/../../elsewhere.pt", "checkpoints", ""]:
        (run / "summary.json").write_text(json.dumps({**summary, "checkpoints": {"best": named}}))
        code, _, err = cli("eval", "--checkpoint", run)
        assert code == 0 and err.startswith(f"using {run / summary['checkpoints']['best']} (the run's best checkpoint)"), named


def test_a_run_without_best_checkpoints_gives_its_last_and_says_so(tabular, tmp_path: Path) -> None:  # noqa: ANN001
    train(tmp_path / "run", "--epochs", "1", "-o", "checkpoint.save_top_k=0")
    code, _, err = cli("eval", "--checkpoint", tmp_path / "run")
    assert code == 0 and err.startswith(f"using {tmp_path / 'run' / 'checkpoints' / 'last.pt'} (the run's last checkpoint "
                                        "(it kept no best checkpoint))"), err


# -- item 4: export builds its example from the dataset's input_shape, whatever it is ------------


@pytest.mark.parametrize(("shape", "fmt"), [("13", "exported-program"), ("13", "torchscript"), ("4x13", "exported-program")])
def test_export_of_a_model_of_feature_vectors_gives_the_models_outputs(tabular, tmp_path: Path, shape: str, fmt: str) -> None:  # noqa: ANN001
    run = tmp_path / "run"
    train(run, "--epochs", "1", "-o", f"dataset.shape={shape}")
    output = tmp_path / "model.file"
    code, out, err = cli("export", "--checkpoint", run, "--format", fmt, "--output", output)
    assert code == 0, out + err
    dims = tuple(int(d) for d in shape.split("x"))
    assert f"input {dims}, task classification, 3 outputs" in out
    from trainer_core.trained import load_trained

    trained = load_trained(run)
    rows = trained.data.val.inputs[:5]  # real samples, before normalisation
    mean, std = (torch.tensor(v).view(1, -1, *[1] * (len(dims) - 1)) for v in (trained.data.mean, trained.data.std))
    with torch.no_grad():
        expected = trained.model((rows - mean) / std)
        model = torch.jit.load(output) if fmt == "torchscript" else torch.export.load(output).module()
        assert torch.allclose(model(rows), expected, atol=1e-5)


def test_export_says_in_one_line_when_the_model_does_not_take_its_declared_input_shape(tabular, tmp_path: Path) -> None:  # noqa: ANN001
    # A dataset that declares (13,) for samples of 12 features, and a model fixed to 12: it trains, but no
    # example built from the declared shape runs through it.
    run = tmp_path / "run"
    train(run, "--epochs", "1", "-o", "dataset.shape=12", "-o", "dataset.declared=13", "-o", "model.fixed=12")
    (tmp_path / "model.pt2").write_bytes(b"previous")
    code, out, err = cli("export", "--checkpoint", run / "checkpoints" / "last.pt", "--format", "exported-program",
                         "--output", tmp_path / "model.pt2")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: cannot export: the model fails on an example batch built from the dataset's input_shape "
                          "(13,) ((3, 13), torch.float32): RuntimeError: "), err
    assert "the dataset's input_shape must be the shape of one sample as the model takes it" in err
    assert (tmp_path / "model.pt2").read_bytes() == b"previous"
