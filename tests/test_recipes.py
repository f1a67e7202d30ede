"""Recipes: each one parses, names installed components with valid options, and
keeps the seed's settings; ``trainer recipes`` and ``trainer run --recipe``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from trainer_core import UsageError
from trainer_core.cli import make_cli
from trainer_core.config import RunConfig, load_config
from trainer_core.entrypoints import DATASETS, MODELS, PLUGINS, Registry
from trainer_core.options import bind_options
from trainer_core.pluginmanager import instantiate
from trainer_core.recipes import find_recipe, list_recipes, recipe_dirs

SOURCE_RECIPES = Path(__file__).resolve().parent.parent / "recipes"
BUILT_IN = sorted(p.stem for p in SOURCE_RECIPES.glob("*.toml"))


def test_the_seed_programs_have_recipes() -> None:
    expected = {"cifar10-convnet", "mnist-mlp-tensorboard", "fashion-mnist-mlp", "hymenoptera-resnet18",
                "hymenoptera-resnet18-momentum", "fashion-mnist-transfer-pretrain", "fashion-mnist-transfer"}
    assert expected <= set(BUILT_IN)


@pytest.mark.parametrize("name", BUILT_IN)
def test_recipe_resolves_to_installed_components_with_valid_options(name: str) -> None:
    config = load_config(SOURCE_RECIPES / f"{name}.toml").validate()
    model = Registry(MODELS).get(config.model).load()
    bind_options(model, config.model_options, owner="model", skip=("input_shape", "num_classes"))
    dataset = Registry(DATASETS).get(config.dataset).load()
    bind_options(dataset, config.dataset_options, owner="dataset", skip=("data_root",))
    plugins = Registry(PLUGINS)
    for plugin, options in config.plugins.items():
        instantiate(plugins.get(plugin), options)  # builds it: options are checked by the plugin itself
    assert find_recipe(name) == SOURCE_RECIPES / f"{name}.toml"


def seed_settings(config: RunConfig) -> tuple[object, ...]:
    return config.model, config.dataset, config.epochs, config.batch_size, config.optimizer, config.lr


def test_recipes_keep_the_seed_settings() -> None:
    cifar = load_config(SOURCE_RECIPES / "cifar10-convnet.toml")
    assert seed_settings(cifar) == ("convnet", "cifar10", 6, 4, "sgd", 0.001) and cifar.momentum == 0
    assert cifar.model_options == {"hidden1": 220, "hidden2": 184} and "class-accuracy" in cifar.plugins
    for name, dataset in (("mnist-mlp-tensorboard", "mnist"), ("fashion-mnist-mlp", "fashion-mnist")):
        config = load_config(SOURCE_RECIPES / f"{name}.toml")
        assert seed_settings(config) == ("mlp", dataset, 2, 100, "adam", 0.001)
        assert config.model_options == {"hidden": 100} and config.plugins["tensorboard"] == {"train_accuracy": True}
    for name, momentum in (("hymenoptera-resnet18", 0.0), ("hymenoptera-resnet18-momentum", 0.9)):
        config = load_config(SOURCE_RECIPES / f"{name}.toml")
        assert seed_settings(config) == ("resnet18", "imagefolder", 20, 4, "sgd", 0.001) and config.momentum == momentum
        assert config.model_options == {"weights": "imagenet"}
        assert config.plugins["freeze"]["train"] == ["fc"]
        assert config.plugins["steplr"] == {"step_size": 7, "gamma": 0.1}
        assert config.plugins["checkpoint"] == {"monitor": "val/acc", "restore_best": True}


def load_helper():  # type: ignore[no-untyped-def]
    """``recipes/fashion_mnist_transfer.py``, a script rather than a module of a package."""
    spec = importlib.util.spec_from_file_location("fashion_mnist_transfer", SOURCE_RECIPES / "fashion_mnist_transfer.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_the_transfer_stages_fit_together() -> None:
    from trainer_core_plugins.datasets.mnist import FASHION_MNIST

    helper = load_helper()
    pretrain = load_config(SOURCE_RECIPES / "fashion-mnist-transfer-pretrain.toml")
    finetune = load_config(SOURCE_RECIPES / "fashion-mnist-transfer.toml")
    # Stage 1 learns every class but the held-out ones (one setting), which the helper reads from its run folder.
    assert pretrain.dataset_options == {"held_out": ["pullover", "coat"]}
    assert helper.PRETRAIN_RUN == Path(pretrain.runs_root) / pretrain.name
    assert pretrain.plugins["checkpoint"]["save_top_k"] == 1  # one best checkpoint: what weights=<run folder> loads
    assert finetune.model_options["weights"] == f"{pretrain.runs_root}/{pretrain.name}"
    assert finetune.model == pretrain.model and finetune.data_root == "data/fashion-mnist-transfer"
    assert finetune.plugins["freeze"] == {"train": ["fc3"]}


def pretrain_run(folder: Path, data_root: Path, *options: str) -> Path:
    """A real (tiny) stage-1 run of the pretrain recipe on ``data_root``'s IDX files."""
    result = CliRunner().invoke(make_cli(), ["run", "--recipe", "fashion-mnist-transfer-pretrain", "--data-root",
                                             str(data_root), "--epochs", "1", "-q", "--run-dir", str(folder), *options])
    assert result.exit_code == 0, result.output
    return folder


def test_transfer_helper_exports_png_folders(tmp_path: Path) -> None:
    from PIL import Image

    from trainer_core_plugins.datasets.imagefolder import load as load_folder
    from test_datasets import write_idx_dataset  # tests/ is on sys.path (pytest prepends it)

    arrays = write_idx_dataset(tmp_path / "idx", train=60, val=40)
    helper = load_helper()
    out = tmp_path / "export"
    run = pretrain_run(tmp_path / "pretrain", tmp_path / "idx")
    assert helper.main(["--out", str(out), "--data-root", str(tmp_path / "idx"), "--per-class", "3",
                        "--val-per-class", "2", "--from-run", str(run)]) == 0
    data = load_folder(out, image_size=28, resize=28, augment=False, channels=1, normalization="none")
    assert data.classes == ["coat", "pullover"] and len(data.train) == 6 and len(data.val) == 4
    first = sorted((out / "val" / "coat").iterdir())[0]  # file names are the images' indices in the IDX file
    pixels = np.asarray(Image.open(first))
    assert np.array_equal(pixels, arrays["t10k-images-idx3-ubyte"][int(first.stem)])
    assert arrays["t10k-labels-idx1-ubyte"][int(first.stem)] == 4  # coat
    # An existing folder is never overwritten or mixed.
    assert helper.main(["--out", str(out), "--data-root", str(tmp_path / "idx"), "--from-run", str(run)]) == 2
    assert len(list((out / "train" / "coat").iterdir())) == 3


def test_the_held_out_classes_are_one_setting_for_both_stages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trainer_core_plugins.datasets.imagefolder import load as load_folder
    from test_datasets import write_idx_dataset

    write_idx_dataset(tmp_path / "idx", train=60, val=40)
    helper = load_helper()
    run = pretrain_run(tmp_path / "pretrain", tmp_path / "idx", "-o", "dataset.held_out=sandal,sneaker")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    trained_on = load_config(run / "config.toml").dataset_options
    assert trained_on == {"held_out": ["sandal", "sneaker"]}
    # Stage 2's images are the classes stage 1 never saw, with no second setting to keep in step.
    common = ["--data-root", str(tmp_path / "idx"), "--per-class", "2", "--val-per-class", "2", "--from-run", str(run)]
    assert helper.main(["--out", str(tmp_path / "export"), *common]) == 0
    data = load_folder(tmp_path / "export", image_size=28, resize=28, augment=False, channels=1, normalization="none")
    assert data.classes == ["sandal", "sneaker"]
    # Classes the pretrained model has seen are refused, and no folder is written.
    assert helper.main(["--out", str(tmp_path / "leak"), *common, "--classes", "coat,sandal"]) == 2
    assert "coat not held out by the run" in capsys.readouterr().err and not (tmp_path / "leak").exists()
    assert helper.main(["--out", str(tmp_path / "none"), "--from-run", str(tmp_path / "nothing")]) == 2
    assert "run stage 1 first" in capsys.readouterr().err


def test_recipe_descriptions_and_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = tmp_path / "recipes"
    own.mkdir()
    (own / "cifar10-convnet.toml").write_text("# my own CIFAR run\n#\n# on two lines\nepochs = 1\n")
    (own / "quick.toml").write_text('epochs = 1\n[dataset]\nname = "fake"\n')
    monkeypatch.chdir(tmp_path)
    assert recipe_dirs()[0] == own
    recipes = {r.name: r for r in list_recipes()}
    assert recipes["cifar10-convnet"].path == own / "cifar10-convnet.toml"  # ./recipes comes first
    assert recipes["cifar10-convnet"].description == "my own CIFAR run on two lines"
    assert recipes["quick"].description == "" and "fashion-mnist-mlp" in recipes
    assert find_recipe("quick.toml") == own / "quick.toml"
    with pytest.raises(UsageError, match=r"unknown recipe 'cifar-convnet' \(did you mean 'cifar10-convnet'\?\); recipes in .*quick"):
        find_recipe("cifar-convnet")


def test_trainer_recipes_lists_names_and_descriptions() -> None:
    result = CliRunner().invoke(make_cli(), ["recipes"])
    assert result.exit_code == 0
    for name in BUILT_IN:
        assert f"{name}  (" in result.output
    assert "The seed's CIFAR-10 program" in result.output


def test_run_with_a_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "quick.toml").write_text(
        '# a quick run\nepochs = 2\nbatch_size = 16\n[model]\nname = "mlp"\nhidden = 12\n[dataset]\nname = "fake"\n')
    monkeypatch.chdir(tmp_path)
    cli = make_cli()
    result = CliRunner().invoke(cli, ["run", "--recipe", "quick", "--epochs", "1", "--run-dir", "run", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs"] == 1  # the command line overrides the recipe
    saved = load_config(tmp_path / "run" / "config.toml")
    assert (saved.model, saved.model_options, saved.batch_size) == ("mlp", {"hidden": 12}, 16)
    result = CliRunner().invoke(cli, ["run", "--recipe", "quick", "--config", "recipes/quick.toml"])
    assert result.exit_code == 2 and "give --config FILE or --recipe NAME, not both" in result.output
    result = CliRunner().invoke(cli, ["run", "--recipe", "quik"])
    assert result.exit_code == 2 and "unknown recipe 'quik' (did you mean 'quick'?)" in result.output


@pytest.mark.slow
def test_hymenoptera_recipe_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The seed's transfer-learning recipe on a tiny ants/bees tree, with a stand-in for
    torchvision's ImageNet file in the hub cache: only the head learns, batch-norm
    statistics adapt (the seed kept model.train()), the best checkpoint is written."""
    import torch
    import torchvision
    from test_datasets import write_image_tree  # tests/ is on sys.path (pytest prepends it)

    from trainer_core.checkpointing import load_checkpoint

    write_image_tree(tmp_path / "hymenoptera_data", per_class=2)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    imagenet = torchvision.models.resnet18().state_dict()
    torch.save(imagenet, tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    run = tmp_path / "run"
    result = CliRunner().invoke(make_cli(), ["run", "--recipe", "hymenoptera-resnet18", "--epochs", "2", "--data-root",
                                             str(tmp_path / "hymenoptera_data"), "--run-dir", str(run), "--quiet"])
    assert result.exit_code == 0, result.output
    best = list((run / "checkpoints").glob("best-*.pt"))
    assert len(best) == 1
    weights = load_checkpoint(best[0])["model"]
    assert torch.equal(weights["layer3.0.conv1.weight"], imagenet["layer3.0.conv1.weight"])  # frozen
    assert not torch.equal(weights["bn1.running_mean"], imagenet["bn1.running_mean"])  # statistics adapted
    assert weights["fc.weight"].shape == (2, 512)


@pytest.mark.parametrize("recipe", ["cifar10-convnet", "mnist-mlp-tensorboard"])
def test_seed_recipes_run_on_small_files(recipe: str, tmp_path: Path) -> None:
    """The CIFAR-10 and MNIST recipes, one epoch on small files in the real formats."""
    from test_datasets import write_cifar, write_idx_dataset  # tests/ is on sys.path (pytest prepends it)

    (write_cifar if recipe.startswith("cifar") else write_idx_dataset)(tmp_path / "data")
    run = tmp_path / "run"
    result = CliRunner().invoke(make_cli(), ["run", "--recipe", recipe, "--epochs", "1", "--data-root",
                                             str(tmp_path / "data"), "--run-dir", str(run), "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    if recipe.startswith("cifar"):
        assert "val/acc/airplane" in metrics  # class-accuracy
    else:
        assert any(run.glob("events.out.tfevents.*"))
