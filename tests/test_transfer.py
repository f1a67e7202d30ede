"""Starting weights that cannot fail silently (issue 18, items 1 and 2): a grey
first convolution adapted to RGB, any other misfit outside the head an error
unless ``model.strict=false``, ``freeze`` refusing layers the weights did not
provide, and the input normalisation carried from a checkpoint to the run that
starts from it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from trainer_core import UsageError, load_checkpoint, loaded_weights
from trainer_core.cli import make_cli
from trainer_core_plugins.models import smallcnn


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(make_cli(), ["run", "--epochs", "1", "-q", *args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run on grey digits (normalised with their mean and std) that keeps its best checkpoint."""
    folder = tmp_path_factory.mktemp("pretrain") / "digits"
    code, output = run("--model", "smallcnn", "--dataset", "digits", "--plugins", "checkpoint", "--run-dir", str(folder))
    assert code == 0, output
    return folder


def test_grey_weights_adapt_to_an_rgb_model(digits_run: Path, caplog: pytest.LogCaptureFixture) -> None:
    grey = smallcnn.build((1, 8, 8), 10, weights=str(digits_run))
    with caplog.at_level(logging.WARNING, logger="trainer_core"):
        rgb = smallcnn.build((3, 8, 8), 2, weights=str(digits_run))
    assert "features.0.weight adapted from grey to RGB" in caplog.text
    image = torch.rand(1, 1, 8, 8)  # a grey picture shown in RGB gets the grey model's response
    assert torch.allclose(rgb.features[0](image.expand(1, 3, 8, 8)), grey.features[0](image), atol=1e-5)
    record = loaded_weights(rgb)
    assert record is not None and record.adapted == ["features.0.weight"]
    assert record.unloaded == ["classifier.4.weight", "classifier.4.bias"]  # only the new head is fresh


def test_a_misfit_outside_the_head_is_an_error_unless_not_strict(digits_run: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"do not fit this model outside its head: features\.0\.bias.*model\.strict=false"):
        smallcnn.build((1, 8, 8), 10, width=16, weights=str(digits_run))
    code, output = run("--model", "smallcnn", "--dataset", "digits", "-o", "model.width=16", "-o",
                       f"model.weights={digits_run}", "--run-dir", str(tmp_path / "refused"))
    assert code == 2 and output.startswith("error: weights from ") and "Traceback" not in output
    assert not (tmp_path / "refused").exists()
    loose = smallcnn.build((1, 8, 8), 10, width=16, weights=str(digits_run), strict=False)
    record = loaded_weights(loose)
    assert record is not None and "features.0.weight" in record.unloaded


def test_freeze_refuses_layers_the_weights_did_not_provide(digits_run: Path, tmp_path: Path) -> None:
    base = ["--model", "smallcnn", "--dataset", "digits", "--plugins", "freeze", "-o", f"model.weights={digits_run}"]
    code, output = run(*base, "-o", "model.width=16", "-o", "model.strict=false", "--run-dir", str(tmp_path / "frozen"))
    assert code == 2, output
    assert "freeze: features.0.weight, features.0.bias" in output and "were not loaded from" in output
    code, output = run(*base, "--run-dir", str(tmp_path / "fits"))  # every frozen layer loaded: runs
    assert code == 0, output


def test_checkpoints_record_the_input_normalisation(digits_run: Path, tmp_path: Path) -> None:
    best = next((digits_run / "checkpoints").glob("best-*.pt"))
    recorded = load_checkpoint(best)["normalization"]
    assert len(recorded["mean"]) == 1 and 0.2 < recorded["mean"][0] < 0.4 and 0.3 < recorded["std"][0] < 0.5
    # The same dataset: nothing said.  Another normalisation (fake images: none): one line.
    code, output = run("--model", "smallcnn", "--dataset", "digits", "-o", f"model.weights={digits_run}",
                       "--run-dir", str(tmp_path / "same"))
    assert code == 0 and "normalisation" not in output, output
    code, output = run("--model", "smallcnn", "--dataset", "fake", "-o", f"model.weights={digits_run}",
                       "--run-dir", str(tmp_path / "other"))
    assert code == 0, output
    lines = [line for line in output.splitlines() if "were trained on inputs with" in line]
    assert len(lines) == 1 and f"mean ({recorded['mean'][0]:.4g}) std ({recorded['std'][0]:.4g})" in lines[0]
    assert "this run feeds them no normalisation" in lines[0]


def test_imagenet_weights_expect_imagenet_normalisation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    small = ["-o", "dataset.channels=3", "-o", "dataset.image_size=32", "-o", "dataset.train_size=8", "-o", "dataset.val_size=4"]
    code, output = run("--model", "resnet18", "-o", "model.weights=imagenet", "--dataset", "fake", *small,
                       "--run-dir", str(tmp_path / "raw"))
    assert code == 0, output
    lines = [line for line in output.splitlines() if "were trained on inputs with" in line]
    assert len(lines) == 1 and "mean (0.485, 0.456, 0.406) std (0.229, 0.224, 0.225)" in lines[0], output
    assert "this run feeds them no normalisation" in lines[0]
    # A grey dataset normalised with ImageNet's statistics averaged over R, G and B fits them (adapted weights).
    from trainer_core import Normalization

    imagenet = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert imagenet.matches(Normalization((sum(imagenet.mean) / 3,), (sum(imagenet.std) / 3,)))
    assert not imagenet.matches(Normalization()) and not imagenet.matches(Normalization((0.5,), (0.5,)))


def test_published_weights_without_batch_norm_counters_load_strictly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Many ImageNet files leave out num_batches_tracked (a step counter, not a learned weight).
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    weights = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(weights, tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    small = ["-o", "dataset.channels=3", "-o", "dataset.image_size=32", "-o", "dataset.train_size=8", "-o", "dataset.val_size=4"]
    code, output = run("--model", "resnet18", "-o", "model.weights=imagenet", "--dataset", "fake", *small,
                       "--run-dir", str(tmp_path / "run"))
    assert code == 0, output


def test_weights_from_a_run_folder_are_its_best_as_trainer_eval_takes_them(tmp_path: Path) -> None:
    # Every epoch's best kept (save_top_k=-1): the folder holds several best-*.pt and its summary names one.
    folder = tmp_path / "pretrain"
    code, output = run("--model", "smallcnn", "--dataset", "digits", "--epochs", "3", "-o", "checkpoint.save_top_k=-1",
                       "-o", "checkpoint.monitor=val/loss", "--run-dir", str(folder))
    assert code == 0, output
    assert len(list((folder / "checkpoints").glob("best-*.pt"))) > 1
    code, output = run("--model", "smallcnn", "--dataset", "digits", "-o", f"model.weights={folder}",
                       "--run-dir", str(tmp_path / "fine-tune"))
    assert code == 0, output


def test_exported_safetensors_carry_the_input_normalisation(digits_run: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    exported = tmp_path / "digits.safetensors"
    result = CliRunner().invoke(make_cli(), ["export", "--checkpoint", str(digits_run), "--format", "safetensors",
                                             "--output", str(exported)])
    assert result.exit_code == 0, result.output
    recorded = load_checkpoint(next((digits_run / "checkpoints").glob("best-*.pt")))["normalization"]
    code, output = run("--model", "smallcnn", "--dataset", "fake", "-o", f"model.weights={exported}",
                       "--run-dir", str(tmp_path / "other"))
    assert code == 0, output
    lines = [line for line in output.splitlines() if "were trained on inputs with" in line]
    assert len(lines) == 1 and f"mean ({recorded['mean'][0]:.4g}) std ({recorded['std'][0]:.4g})" in lines[0]
    # Another program's safetensors file says nothing of its inputs: nothing to compare.
    plain = tmp_path / "plain.safetensors"
    save_file(smallcnn.build((1, 8, 8), 10, weights=str(exported)).state_dict(), str(plain))
    code, output = run("--model", "smallcnn", "--dataset", "fake", "-o", f"model.weights={plain}",
                       "--run-dir", str(tmp_path / "plain"))
    assert code == 0 and "normalisation" not in output, output
