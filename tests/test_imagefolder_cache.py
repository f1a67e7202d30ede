"""imagefolder's decode-once cache (issue 17, item 5) and the default number of
loader processes, on small real PNG folders written here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

from trainer_core import TensorSplit, UsageError
from trainer_core.cli import make_cli
from trainer_core.data import Batches
from trainer_core.loading import default_workers
from trainer_core_plugins.datasets import imagefolder
from trainer_core_plugins.datasets.batch_crops import crop_boxes, resized_crops
from trainer_core_plugins.datasets.folder_cache import check_fits

SIZES = [(12, 10), (9, 14), (16, 16), (7, 11)]  # (width, height): not square, not alike


def write_folder(root: Path, per_class: int = 3) -> Path:
    """``train/`` and ``val/`` with two classes of random RGB PNGs of several sizes."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("sandal", "sneaker"):
            (root / split / label).mkdir(parents=True)
            for i in range(per_class):
                width, height = SIZES[i % len(SIZES)]
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


def run(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(make_cli(), ["run", *[str(a) for a in args]])
    return result.exit_code, result.output


@pytest.mark.parametrize("channels", [3, 1])
def test_cache_holds_exactly_what_the_deterministic_transforms_give(tmp_path: Path, channels: int) -> None:
    write_folder(tmp_path)
    options = dict(image_size=8, resize=10, augment=False, channels=channels)
    streamed, cached = imagefolder.load(tmp_path, **options), imagefolder.load(tmp_path, cache=True, **options)
    assert isinstance(cached.train, TensorSplit) and isinstance(cached.val, TensorSplit)
    assert cached.train.augment is None and cached.val.augment is None
    for split in ("train", "val"):
        files = getattr(streamed, split)
        expected = torch.stack([files[i][0] for i in range(len(files))])
        assert expected.shape == (6, channels, 8, 8)
        assert torch.equal(getattr(cached, split).inputs, expected)  # decoded once, bit for bit the same
        assert getattr(cached, split).targets.tolist() == files.targets
    assert (cached.classes, cached.input_shape, cached.mean) == (streamed.classes, streamed.input_shape, streamed.mean)


def test_cached_training_images_are_kept_whole_and_cropped_per_batch(tmp_path: Path) -> None:
    write_folder(tmp_path)
    data = imagefolder.load(tmp_path, image_size=8, cache=True)  # resize 9: sources up to 16 px kept at 9 x 9
    assert isinstance(data.train, TensorSplit) and data.train.inputs.shape == (6, 3, 9, 9)
    assert data.val.inputs.shape == (6, 3, 8, 8)
    whole = TF.resize(Image.open(tmp_path / "train" / "sandal" / "1.png"), [9, 9])
    assert torch.equal(data.train.inputs[1], TF.pil_to_tensor(whole))

    def epoch(seed: int, start: int = 0) -> list[torch.Tensor]:
        batches = Batches(data.train, 4, torch.device("cpu"), shuffle=True, seed=seed)
        return [inputs for inputs, _ in batches.iterate(epoch=1, start_batch=start)]

    first = epoch(seed=3)
    assert [b.shape for b in first] == [(4, 3, 8, 8), (2, 3, 8, 8)] and all(b.dtype == torch.float32 for b in first)
    low, high = (0 - max(imagefolder.IMAGENET_MEAN)) / min(imagefolder.IMAGENET_STD), 1 / min(imagefolder.IMAGENET_STD)
    assert all(low <= b.min() and b.max() <= high for b in first)  # uint8 crops, scaled and normalised
    again = epoch(seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # the same seed draws the same crops
    assert torch.equal(epoch(seed=3, start=1)[0], first[1])  # and so does a run resumed mid-epoch
    assert not torch.equal(epoch(seed=4)[0], first[0])


def test_crop_boxes_follow_torchvisions_rules() -> None:
    generator = torch.Generator().manual_seed(0)
    height, width = torch.full((2000,), 30.0), torch.full((2000,), 40.0)
    top, left, h, w = crop_boxes(height, width, generator)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area = h * w / (height * width)
    assert area.min() >= 0.06 and area.max() <= 1 and area.mean() > 0.4  # 8-100 % of the image, up to rounding
    assert ((w / h) > 0.6).all() and ((w / h) < 1.6).all()
    # An image no try fits: torchvision's centre crop of the widest box within the ratio range.
    expected = transforms.RandomResizedCrop.get_params(Image.new("RGB", (100, 1)), [0.08, 1.0], [3 / 4, 4 / 3])
    got = crop_boxes(torch.tensor([1.0]), torch.tensor([100.0]), generator)
    assert tuple(int(v) for v in got) == expected == (0, 49, 1, 1)


def test_resized_crops_resample_as_pil_does() -> None:
    rng = np.random.default_rng(1)
    source = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    images = TF.pil_to_tensor(source)[None]
    top, left, h, w = 3, 5, 10, 12  # an upsampling crop, 12 x 10 px -> 32 x 32
    expected = TF.pil_to_tensor(TF.resized_crop(source, top, left, h, w, [32, 32]))
    box = (torch.tensor([top / 20]), torch.tensor([left / 24]), torch.tensor([h / 20]), torch.tensor([w / 24]))
    for flip in (False, True):
        got = resized_crops(images, box, torch.tensor([flip]), 32)[0]
        want = expected.flip(-1) if flip else expected
        assert got.shape == want.shape and got.dtype == torch.uint8
        # Inside, bilinear within rounding; PIL's crop clamps at the box's edge, grid_sample reads past it.
        inner = (got.int() - want.int())[:, 2:-2, 2:-2].abs()
        assert inner.max() <= 1
    whole = resized_crops(images, (torch.zeros(1), torch.zeros(1), torch.ones(1), torch.ones(1)), torch.tensor([False]), 20)
    assert whole.shape == (1, 3, 20, 20)


def test_a_cache_larger_than_half_the_free_memory_is_refused_in_one_line(tmp_path: Path) -> None:
    check_fits([(10, 3, 100)], available=6000)  # 3,000 bytes: fits in half of 6,000
    with pytest.raises(UsageError, match=r"need 0 MiB, more than half of the 0 MiB of memory free.*dataset.cache=false"):
        check_fits([(10, 3, 100)], available=5999)
    write_folder(tmp_path / "data")
    # 6 validation images of 3 x 10^6 x 10^6 bytes each: beyond any machine's memory (checked before decoding).
    code, output = run("--dataset", "imagefolder", "--data-root", tmp_path / "data", "-o", "dataset.image_size=1000000",
                       "-o", "dataset.cache=true", "--model", "mlp", "--run-dir", tmp_path / "run")
    lines = output.strip().splitlines()
    assert code == 2 and len(lines) == 1, output
    assert lines[0].startswith("error: dataset.cache: the decoded images need ") and "read them from disk" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["not-an-image", "truncated"])
def test_an_unreadable_image_is_named_in_one_line(tmp_path: Path, damage: str) -> None:
    write_folder(tmp_path / "data")
    bad = tmp_path / "data" / "train" / "sneaker" / "1.png"
    good = bad.read_bytes()
    bad.write_bytes(b"no image here" if damage == "not-an-image" else good[: len(good) // 2])
    code, output = run("--dataset", "imagefolder", "--data-root", tmp_path / "data", "-o", "dataset.image_size=8",
                       "-o", "dataset.cache=true", "--model", "mlp", "--run-dir", tmp_path / "run")
    lines = output.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: cannot read {bad} ("), output
    assert lines[0].endswith("); replace or remove it")


def test_an_unreadable_validation_image_is_named_in_one_line_also_with_tensorboard(tmp_path: Path) -> None:
    # tensorboard's image grid reads validation samples itself: through the same named reads.
    write_folder(tmp_path / "data")
    bad = tmp_path / "data" / "val" / "sneaker" / "1.png"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    for plugins in ("no:tensorboard", "tensorboard"):
        code, output = run("--dataset", "imagefolder", "--data-root", tmp_path / "data", "-o", "dataset.image_size=8",
                           "--model", "mlp", "--batch-size", "2", "--plugins", plugins, "-q", "--run-dir", tmp_path / f"run-{plugins}")
        lines = output.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: cannot read {bad} ("), (plugins, output)


def test_a_cached_folder_trains_in_a_run(tmp_path: Path) -> None:
    write_folder(tmp_path / "data", per_class=4)
    code, output = run("--dataset", "imagefolder", "--data-root", tmp_path / "data", "-o", "dataset.image_size=16",
                       "-o", "dataset.cache=true", "--model", "convnet", "--epochs", "2", "--batch-size", "4",
                       "--run-dir", tmp_path / "run", "--quiet")
    assert code == 0, output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs"] == 2 and 0 <= summary["final"]["val/acc"] <= 1


def test_default_loader_processes_leave_the_training_threads_their_cores(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(cores)  # torch's own default: one thread per core
        assert default_workers(torch.device("cpu")) == 0
        torch.set_num_threads(1)
        assert default_workers(torch.device("cpu")) == min(4, cores - 1)
    finally:
        torch.set_num_threads(threads)
    assert default_workers(torch.device("cuda")) == min(4, cores - 1)  # the host is free while the GPU computes
    write_folder(tmp_path)
    batches = Batches(imagefolder.load(tmp_path, image_size=8).train, 4, torch.device("cpu"), shuffle=True)
    assert batches.loader is not None and batches.loader.num_workers == default_workers(torch.device("cpu"))
