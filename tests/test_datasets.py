"""The file-backed datasets, on small files written here in their true on-disk formats."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from trainer_core_plugins.datasets import cifar10, imagefolder, mnist
from trainer_core import UsageError
from trainer_core.cli import make_cli
from trainer_core.data import Batches, TensorSplit

# -- IDX (MNIST, Fashion-MNIST) ---------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format: two zero bytes, type 0x08 (unsigned byte), the number of
    dimensions, each dimension as a big-endian int32, then the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_dataset(folder: Path, train: int = 30, val: int = 20, gz: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """Four IDX files like the real ones (each class's images have their own brightness)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, size in (("train", train), ("t10k", val)):
        labels = np.arange(size) % 10
        images = (labels[:, None, None] * 25 + rng.integers(0, 5, (size, 28, 28))).astype(np.uint8)
        arrays[f"{prefix}-images-idx3-ubyte"] = images
        arrays[f"{prefix}-labels-idx1-ubyte"] = labels.astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_mnist_reads_idx_files(tmp_path: Path, gz: bool) -> None:
    arrays = write_idx_dataset(tmp_path, gz=gz)
    data = mnist.load_mnist(tmp_path)
    assert data.input_shape == (1, 28, 28) and data.classes == [str(d) for d in range(10)]
    assert isinstance(data.train, TensorSplit) and data.train.inputs.dtype == torch.uint8
    assert data.train.inputs.shape == (30, 1, 28, 28) and data.val.inputs.shape == (20, 1, 28, 28)
    assert torch.equal(data.train.inputs[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert torch.equal(data.val.targets, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    assert data.mean is None and data.std is None  # the seed used ToTensor only


def test_torchvision_layout_and_normalize(tmp_path: Path) -> None:
    arrays = write_idx_dataset(tmp_path / "FashionMNIST" / "raw")
    data = mnist.load_fashion_mnist(tmp_path, normalize=True)
    pixels = arrays["train-images-idx3-ubyte"] / 255.0
    assert data.mean == pytest.approx((pixels.mean(),), rel=1e-5)
    assert data.std == pytest.approx((pixels.std(ddof=1),), rel=1e-4)
    assert data.classes[0] == "tshirt" and data.classes[-1] == "ankle-boot"


def test_classes_option_keeps_and_renumbers(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path)
    data = mnist.load_fashion_mnist(tmp_path, classes=["sandal", "0"])
    assert data.classes == ["sandal", "tshirt"]
    # Labels run 0..9 repeatedly: T-shirt (0) becomes 1 and sandal (5) becomes 0, in file order,
    # and each keeps its own images.
    assert data.train.targets.tolist() == [1, 0, 1, 0, 1, 0]
    brightness = data.train.inputs.float().mean(dim=(1, 2, 3))
    assert (brightness[data.train.targets == 0] > 120).all() and (brightness[data.train.targets == 1] < 10).all()
    assert len(data.train) == 6 and len(data.val) == 4
    with pytest.raises(ValueError, match="unknown class 'sandals'.*tshirt, trouser"):
        mnist.load_fashion_mnist(tmp_path, classes=["sandals"])


def test_missing_files_name_the_files_folder_and_remedy(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        mnist.load_fashion_mnist(tmp_path)
    message = str(info.value)
    assert "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert str(tmp_path) in message and "apt-get install dataset-fashion-mnist" in message
    assert "\n" not in message


def test_fashion_mnist_default_folder_is_debians() -> None:
    assert Path("/usr/share/datasets/fashion-mnist") in mnist.FASHION_MNIST.default_roots


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_truncated_file_is_named(tmp_path: Path, gz: bool) -> None:
    write_idx_dataset(tmp_path, gz=gz)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    path = tmp_path / name
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(UsageError, match=rf"{name}.*(damaged|truncated)"):
        mnist.load_mnist(tmp_path)


def test_wrong_file_and_mismatched_counts(tmp_path: Path) -> None:
    arrays = write_idx_dataset(tmp_path, gz=False)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes((tmp_path / "train-images-idx3-ubyte").read_bytes())  # images where labels belong
    with pytest.raises(UsageError, match="train-labels-idx1-ubyte holds 3-dimensional data"):
        mnist.load_mnist(tmp_path)
    labels.write_bytes(idx_bytes(arrays["train-labels-idx1-ubyte"][:29]))
    with pytest.raises(UsageError, match="30 images but .* 29 labels"):
        mnist.load_mnist(tmp_path)


def test_mnist_trains_from_the_command_line(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path / "data", train=60, val=20)
    result = CliRunner().invoke(make_cli(), [
        "run", "--dataset", "mnist", "--data-root", str(tmp_path / "data"), "--model", "mlp", "--epochs", "1",
        "--batch-size", "16", "--run-dir", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "summary.json").is_file()


def test_missing_data_on_the_command_line_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(make_cli(), ["run", "--dataset", "mnist", "--data-root", str(tmp_path),
                                             "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("error: mnist data not found")
    assert not (tmp_path / "run").exists()  # a bad command leaves nothing behind


# -- CIFAR-10 python pickles -------------------------------------------------------------


def write_cifar(root: Path, per_batch: int = 8, meta: bool = True) -> dict[str, dict[bytes, object]]:
    """``cifar-10-batches-py`` as the archive holds it: pickled dicts with byte-string
    keys, ``data`` an ``N x 3072`` uint8 array (all red, then green, then blue
    values, row-major), ``labels`` a list of ints."""
    folder = root / cifar10.FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in (*cifar10.TRAIN_FILES, cifar10.VAL_FILE):
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(x) for x in rng.integers(0, 10, per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"{i}.png".encode() for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        batches[name] = batch
    if meta:
        names = [n.encode() for n in cifar10.CLASSES]
        (folder / cifar10.META_FILE).write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2))
    return batches


def test_cifar10_reads_the_pickled_batches(tmp_path: Path) -> None:
    batches = write_cifar(tmp_path)
    data = cifar10.load(tmp_path)
    assert data.input_shape == (3, 32, 32) and data.classes == list(cifar10.CLASSES)
    assert data.train.inputs.shape == (40, 3, 32, 32) and data.train.inputs.dtype == torch.uint8
    assert data.mean == (0.5, 0.5, 0.5) and data.std == (0.5, 0.5, 0.5)
    first = batches["data_batch_1"][b"data"][0]
    # Pixel (row 2, column 3) of each channel: offset channel * 1024 + 2 * 32 + 3.
    for channel in range(3):
        assert data.train.inputs[0, channel, 2, 3] == first[channel * 1024 + 67]
    assert data.val.targets.tolist() == batches["test_batch"][b"labels"]
    # --data-root may also be the batches folder itself.
    assert torch.equal(cifar10.load(tmp_path / cifar10.FOLDER).val.inputs, data.val.inputs)


def test_cifar10_normalisation_matches_the_seed_transform(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    data = cifar10.load(tmp_path)
    batch, _ = next(Batches(data.val, 8, torch.device("cpu"), shuffle=False, mean=data.mean, std=data.std).iterate())
    # ToTensor then Normalize((0.5,)*3, (0.5,)*3) as in the seed program.
    expected = (data.val.inputs.float() / 255 - 0.5) / 0.5
    assert torch.allclose(batch, expected)


def test_cifar10_missing_and_damaged_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"cifar10 data not found: expected data_batch_1.*cifar-10-python.tar.gz"):
        cifar10.load(tmp_path)
    write_cifar(tmp_path)
    batch = tmp_path / cifar10.FOLDER / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(UsageError, match="data_batch_3 is damaged"):
        cifar10.load(tmp_path)


def test_cifar10_pickle_cannot_run_code(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (Path.touch, (marker,))

    (tmp_path / cifar10.FOLDER / "test_batch").write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}))
    with pytest.raises(UsageError, match="test_batch is damaged or not a CIFAR-10 batch.*refusing to load"):
        cifar10.load(tmp_path)
    assert not marker.exists()


# -- image folders ---------------------------------------------------------------------------


def write_image_tree(root: Path, classes: tuple[str, ...] = ("ants", "bees"), per_class: int = 3,
                     size: tuple[int, int] = (60, 40)) -> None:
    """``train/<class>/`` and ``val/<class>/`` with PNG and JPEG files; each class has its own colour."""
    for split in ("train", "val"):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                colour = (200 if index == 0 else 30, 100, 30 if index == 0 else 200)
                image = Image.new("RGB", size, colour)
                image.save(folder / (f"{i}.png" if i % 2 == 0 else f"{i}.jpg"))


def test_imagefolder_seed_transforms(tmp_path: Path) -> None:
    write_image_tree(tmp_path)
    data = imagefolder.load(tmp_path)
    assert data.classes == ["ants", "bees"] and data.input_shape == (3, 224, 224)
    assert data.mean == imagefolder.IMAGENET_MEAN and data.std == imagefolder.IMAGENET_STD
    assert len(data.train) == 6 and len(data.val) == 6
    image, label = data.val[1]  # ants/1.jpg
    assert image.dtype == torch.uint8 and image.shape == (3, 224, 224) and label == 0
    assert abs(int(image[0].float().mean()) - 200) <= 3 and abs(int(image[2].float().mean()) - 30) <= 3
    train_image, _ = data.train[3]
    assert train_image.shape == (3, 224, 224)
    names = [type(t).__name__ for t in data.train.transform.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "PILToTensor"]
    names = [(type(t).__name__, getattr(t, "size", None)) for t in data.val.transform.transforms]
    assert names == [("Resize", 256), ("CenterCrop", (224, 224)), ("PILToTensor", None)]


def test_imagefolder_small_grayscale_without_augmentation(tmp_path: Path) -> None:
    write_image_tree(tmp_path, size=(28, 28))
    data = imagefolder.load(tmp_path, image_size=28, resize=28, augment=False, channels=1, normalization="none")
    assert data.input_shape == (1, 28, 28) and data.mean is None and data.std is None
    image, _ = data.train[0]
    expected = round(0.299 * 200 + 0.587 * 100 + 0.114 * 30)  # PIL's luma of the ants' colour
    assert image.shape == (1, 28, 28) and abs(int(image.float().mean()) - expected) <= 1


def test_imagefolder_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs --data-root"):
        imagefolder.load(None)
    with pytest.raises(UsageError, match=f"image folder {tmp_path / 'train'} does not exist"):
        imagefolder.load(tmp_path)
    write_image_tree(tmp_path)
    (tmp_path / "val" / "wasps").mkdir()
    (tmp_path / "val" / "wasps" / "a.png").write_bytes((tmp_path / "val" / "ants" / "0.png").read_bytes())
    with pytest.raises(UsageError, match="has classes ants, bees, wasps but .* has ants, bees"):
        imagefolder.load(tmp_path)
    (tmp_path / "val" / "wasps" / "a.png").unlink()
    with pytest.raises(UsageError, match="Found no valid file for the classes wasps"):
        imagefolder.load(tmp_path)


def test_imagefolder_streams_through_a_dataloader_in_a_run(tmp_path: Path) -> None:
    write_image_tree(tmp_path / "data", per_class=4)
    result = CliRunner().invoke(make_cli(), [
        "run", "--dataset", "imagefolder", "--data-root", str(tmp_path / "data"), "-o", "dataset.image_size=32",
        "--model", "convnet", "--epochs", "2", "--batch-size", "4", "--run-dir", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert '"val/acc"' in (tmp_path / "run" / "summary.json").read_text()
