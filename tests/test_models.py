"""The built-in models on every dataset shape, and their starting weights."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from trainer_core_plugins.models import convnet, mlp, torchvision_models
from trainer_core import UsageError
from trainer_core.checkpointing import save_checkpoint
from trainer_core.cli import make_cli

# digits, the MNIST family, CIFAR-10, image folders (a small batch)
SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 224, 224)]
FACTORIES = {
    "convnet": convnet.build,
    "mlp": mlp.build,
    "resnet18": torchvision_models.build_resnet18,
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(FACTORIES))
def test_every_model_trains_on_every_shape(name: str, shape: tuple[int, int, int]) -> None:
    if name == "convnet" and shape[1] < convnet.MIN_SIDE:
        with pytest.raises(ValueError, match="convnet needs images of at least 16x16 pixels .*got 8x8.*smallcnn"):
            FACTORIES[name](shape, 5)
        return
    torch.manual_seed(0)
    model = FACTORIES[name](shape, 5)
    inputs, targets = torch.randn(2, *shape), torch.tensor([1, 4])
    logits = model(inputs)
    assert logits.shape == (2, 5)
    nn.functional.cross_entropy(logits, targets).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_any_torchvision_model_by_name() -> None:
    model = torchvision_models.build((1, 28, 28), 3, arch="mobilenet_v3_small")
    assert model.features[0][0].in_channels == 1 and model.classifier[-1].out_features == 3
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)


def test_convnet_is_the_seed_network_on_cifar() -> None:
    model = convnet.build((3, 32, 32), 10)
    assert model.fc1.in_features == 16 * 5 * 5 and model.fc1.out_features == 220 and model.fc2.out_features == 184
    # The seed's own module (its layer names and shapes): its state dict loads strictly.
    seed = nn.Module()
    seed.conv1, seed.pool, seed.conv2 = nn.Conv2d(3, 6, 5), nn.MaxPool2d(2, 2), nn.Conv2d(6, 16, 5)
    seed.fc1, seed.fc2, seed.fc3 = nn.Linear(400, 220), nn.Linear(220, 184), nn.Linear(184, 10)
    model.load_state_dict(seed.state_dict(), strict=True)
    assert convnet.build((1, 28, 28), 10, hidden1=64, hidden2=32).fc1.in_features == 16 * 4 * 4


def test_mlp_is_the_seed_network() -> None:
    model = mlp.build((1, 28, 28), 10)
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == [
        ("l1.weight", (100, 784)), ("l1.bias", (100,)), ("l2.weight", (10, 100)), ("l2.bias", (10,))]


def test_option_errors() -> None:
    with pytest.raises(ValueError, match="hidden must be >= 1"):
        mlp.build((1, 28, 28), 10, hidden=0)
    with pytest.raises(ValueError, match="hidden2 must be >= 1"):
        convnet.build((3, 32, 32), 10, hidden2=0)
    with pytest.raises(ValueError, match="convnet has no ImageNet weights"):
        convnet.build((3, 32, 32), 10, weights="imagenet")
    with pytest.raises(ValueError, match="unknown torchvision model 'resnet19' .did you mean 'resnet18'.*alexnet"):
        torchvision_models.build((3, 32, 32), 10, arch="resnet19")


def test_weights_from_a_file_keep_all_but_the_new_head(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(1)
    trained = convnet.build((1, 28, 28), 8)
    torch.save(trained.state_dict(), tmp_path / "eight.pt")
    torch.manual_seed(2)
    with caplog.at_level(logging.WARNING, logger="trainer_core"):
        model = convnet.build((1, 28, 28), 2, weights=str(tmp_path / "eight.pt"))
    for name in ("conv1.weight", "conv2.bias", "fc1.weight", "fc2.weight"):
        assert torch.equal(model.state_dict()[name], trained.state_dict()[name])
    assert model.fc3.out_features == 2  # the head is new, not the 8-class one
    assert "skipped fc3.bias, fc3.weight" in caplog.text and "eight.pt" in caplog.text


def test_a_grayscale_torchvision_model_reloads_its_own_weights(tmp_path: Path) -> None:
    trained = torchvision_models.build_resnet18((1, 28, 28), 8)
    torch.save(trained.state_dict(), tmp_path / "gray.pt")
    model = torchvision_models.build_resnet18((1, 28, 28), 2, weights=str(tmp_path / "gray.pt"))
    assert torch.equal(model.conv1.weight, trained.conv1.weight) and model.fc.out_features == 2


def test_weights_from_a_run_folder_use_its_best_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    best, last = mlp.build((1, 28, 28), 10), mlp.build((1, 28, 28), 10)
    save_checkpoint(run / "checkpoints" / "best-epoch002-val_acc0.9000.pt", {"model": best.state_dict(), "format": 1})
    save_checkpoint(run / "checkpoints" / "last.pt", {"model": last.state_dict(), "format": 1})
    model = mlp.build((1, 28, 28), 10, weights=str(run))
    assert torch.equal(model.l1.weight, best.l1.weight)
    save_checkpoint(run / "checkpoints" / "best-epoch003-val_acc0.9100.pt", {"model": last.state_dict(), "format": 1})
    with pytest.raises(UsageError, match="holds 2 best checkpoints"):
        mlp.build((1, 28, 28), 10, weights=str(run))


def test_weights_for_another_model_are_refused(tmp_path: Path) -> None:
    torch.save(mlp.build((1, 28, 28), 10).state_dict(), tmp_path / "mlp.pt")
    with pytest.raises(UsageError, match="no weights in .*mlp.pt fit this model"):
        convnet.build((1, 28, 28), 10, weights=str(tmp_path / "mlp.pt"))


def test_imagenet_weights_come_only_from_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    with pytest.raises(UsageError) as info:
        torchvision_models.build_resnet18((3, 224, 224), 2, weights="imagenet")
    assert f"expected resnet18-f37072fd.pth in {folder}" in str(info.value) and "never download" in str(info.value)
    assert not folder.exists()
    # The cached file is a plain 1000-class state dict, as torchvision saves it.
    import torchvision

    torch.manual_seed(3)
    imagenet = torchvision.models.resnet18()
    folder.mkdir(parents=True)
    torch.save(imagenet.state_dict(), folder / "resnet18-f37072fd.pth")
    model = torchvision_models.build_resnet18((3, 224, 224), 2, weights="imagenet")
    assert torch.equal(model.layer4[1].conv2.weight, imagenet.layer4[1].conv2.weight)
    assert model.fc.out_features == 2
    # One-channel images: the first convolution sums the RGB filters (same response to a grey image).
    gray = torchvision_models.build_resnet18((1, 28, 28), 2, weights="imagenet")
    assert torch.allclose(gray.conv1.weight, imagenet.conv1.weight.sum(1, keepdim=True))
    grey_image = torch.rand(1, 1, 28, 28)
    assert torch.allclose(gray.conv1(grey_image), imagenet.conv1(grey_image.expand(1, 3, 28, 28)), atol=1e-5)


def test_model_option_errors_on_the_command_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(make_cli(), ["run", "--model", "torchvision", "--dataset", "fake",
                                             "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and "needs option 'arch' (set it with -o model.arch=VALUE)" in result.output
    result = CliRunner().invoke(make_cli(), ["run", "--model", "convnet", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and result.output.startswith("error: model 'convnet': convnet needs images of at least")
    assert not (tmp_path / "run").exists()


def test_smallcnn_starts_from_another_runs_weights_with_a_new_head(tmp_path):
    from trainer_core_plugins.models.smallcnn import build

    source = build((1, 8, 8), 10)
    torch.save(source.state_dict(), tmp_path / "digits.pt")
    target = build((1, 8, 8), 3, weights=str(tmp_path / "digits.pt"))
    assert torch.equal(target.features[0].weight, source.features[0].weight)
    assert torch.equal(target.classifier[2].weight, source.classifier[2].weight)
    assert target.classifier[4].weight.shape == (3, 128)  # the head for 3 classes starts fresh
