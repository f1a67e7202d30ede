"""TensorBoard pictures a practitioner can read (issue 18, item 6): the image
grid samples across classes at any batch size, the confusion matrix is drawn
to be read at the size TensorBoard shows it, and the HParams table lists what
runs are compared by first, with only the settings that apply; read back with
TensorBoard's own reader and sorted as its server sorts them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.plugins.hparams.backend_context import _sort_and_reduce_to_hparams_limit

from trainer_core import DataBundle, TensorSplit
from trainer_core.testing import run_tiny
from trainer_core_plugins.tensorboard import TensorBoard
from trainer_core_plugins.tensorboard_pictures import FITS, confusion_geometry, confusion_picture


def test_the_image_grid_takes_every_class_in_turn_whatever_the_batch(tmp_path: Path) -> None:
    # A validation split read in class order (4 classes of 10), each image its own pattern.
    generator = torch.Generator().manual_seed(0)
    val = torch.randint(0, 256, (40, 1, 4, 4), dtype=torch.uint8, generator=generator)
    labels = torch.arange(40) // 10
    data = DataBundle(train=TensorSplit(val, labels), val=TensorSplit(val, labels), classes=["a", "b", "c", "d"],
                      input_shape=(1, 4, 4))
    run_tiny({"tensorboard": TensorBoard(images=32, graph=False, pr_curves=False)}, data=data, run_dir=tmp_path / "run",
             epochs=1, batch_size=4)
    events = event_accumulator.EventAccumulator(str(tmp_path / "run"), size_guidance={"images": 0})
    events.Reload()
    (grid,) = events.Images("images/val_batch")
    pixels = np.asarray(Image.open(io.BytesIO(grid.encoded_image_string)).convert("L")).astype(int)
    assert pixels.shape == (4 * 6 + 2, 8 * 6 + 2)  # 32 images, 8 a row
    shown = []
    for k in range(32):
        row, column = divmod(k, 8)
        cell = pixels[2 + 6 * row : 6 + 6 * row, 2 + 6 * column : 6 + 6 * column]
        matches = [i for i in range(40) if np.abs(cell - val[i, 0].numpy().astype(int)).max() <= 1]
        assert len(matches) == 1
        shown.append(matches[0])
    assert [int(labels[i]) for i in shown[:8]] == [0, 1, 2, 3, 0, 1, 2, 3]  # every class, in turn
    assert sorted(int(labels[i]) for i in shown).count(0) == 8 and len(set(shown)) == 32


def hparams_of(run: Path) -> tuple[list[str], dict[str, object]]:
    """The HParams table's columns as TensorBoard's server orders them, and the run's values."""
    reader = plugin_event_accumulator.EventAccumulator(str(run))
    reader.Reload()
    content = reader.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    _sort_and_reduce_to_hparams_limit(experiment)  # what the server does before answering
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert isinstance(experiment, api_pb2.Experiment)
    return [info.name for info in experiment.hparam_infos], dict(start.hparams)


def test_hparams_put_the_compared_settings_first_and_only_those_that_apply(tmp_path: Path) -> None:
    # TensorBoard lists the settings marked as differing first, by name, and shows the first five of them.
    compared = ["batch_size", "lr", "momentum", "optimizer", "weight_decay"]
    run_tiny({"tensorboard": TensorBoard(images=0, graph=False)}, run_dir=tmp_path / "adam", epochs=1, optimizer="adam")
    names, values = hparams_of(tmp_path / "adam")
    assert names[:5] == compared, names
    # An Adam run's record lists momentum (the server takes the columns from whichever run it reads
    # first, and an SGD run beside it has one) but holds no value: Adam has none, and nothing compiled.
    assert "momentum" not in values and "compile_mode" not in values and "optimizer" in values
    assert "seed" in names[5:] and "accumulate_grad_batches" in names[5:]
    run_tiny({"tensorboard": TensorBoard(images=0, graph=False)}, run_dir=tmp_path / "sgd", epochs=1, optimizer="sgd")
    names, values = hparams_of(tmp_path / "sgd")
    assert names[:5] == compared and values["momentum"].number_value == 0.9


def test_a_ten_class_confusion_picture_is_shown_unscaled_with_every_count(tmp_path: Path) -> None:
    # TensorBoard's image cards scale a wider picture down, where its text could not be read.
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    confusion = torch.randint(0, 60, (10, 10), generator=torch.Generator().manual_seed(0)) + 900 * torch.eye(10, dtype=torch.int64)
    picture = confusion_picture(confusion, names).permute(1, 2, 0).numpy().astype(int)
    assert picture.shape[1] <= FITS and picture.shape[0] <= FITS
    left, top, cell = confusion_geometry(names)
    for k in range(10):  # each 3-digit diagonal count is written, in white on its dark cell
        inside = picture[top + k * cell + 2 : top + (k + 1) * cell - 2, left + k * cell + 2 : left + (k + 1) * cell - 2]
        assert (inside.min(axis=2) > 200).any(), k
