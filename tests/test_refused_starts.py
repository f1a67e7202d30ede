"""Input found bad at the start of a run (issue 14, item 13's leftovers) is refused before
the run changes anything: a damaged image before the run folder is made, a plugin's
check of its options before the run a folder holds is replaced."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from PIL import Image

from test_datasets import write_image_tree
from test_run_ownership import COMMON, cli, one_error, snapshot

IMAGES = ("--dataset", "imagefolder", "-o", "dataset.image_size=16", "--model", "mlp", "--epochs", "1", "-q")


@pytest.mark.parametrize("split", ["train", "val"])
def test_an_image_damaged_in_its_header_is_refused_before_the_run_folder_is_made(tmp_path: Path, split: str) -> None:
    write_image_tree(tmp_path / "data", per_class=2, size=(20, 20))
    damaged = tmp_path / "data" / split / "bees" / "1.jpg"
    damaged.write_bytes(b"\xff\xd8 not really a JPEG")
    code, output = cli("run", *IMAGES, "--data-root", tmp_path / "data", "--runs-root", tmp_path / "runs")
    assert (code, one_error(output)) == (2, f"error: cannot read {damaged} (UnidentifiedImageError); replace or remove it")
    assert not (tmp_path / "runs").exists()


def test_an_image_damaged_past_its_header_is_named_when_a_loader_process_reads_it(tmp_path: Path) -> None:
    """Headers are all the start reads: damage further in is found, in one line, when the image is decoded."""
    write_image_tree(tmp_path / "data", per_class=2, size=(20, 20))
    encoded = io.BytesIO()
    Image.new("RGB", (20, 20), (30, 100, 200)).save(encoded, "PNG")
    damaged = tmp_path / "data" / "val" / "bees" / "0.png"
    damaged.write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])
    code, output = cli("run", *IMAGES, "--data-root", tmp_path / "data", "--num-workers", "1", "--run-dir", tmp_path / "run")
    assert (code, one_error(output)) == (2, f"error: cannot read {damaged} (OSError: image file is truncated); replace or remove it")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A completed run without checkpoints: what --overwrite and a restarting --resume auto replace."""
    run = tmp_path_factory.mktemp("finished") / "run"
    code, output = cli("run", *COMMON, "--epochs", "1", "--model", "mlp", "-o", "model.hidden=8", "--plugins", "no:checkpoint",
                       "--run-dir", run)
    assert code == 0, output
    return run


@pytest.mark.parametrize("how", [("--overwrite",), ("--resume", "auto")], ids=["overwrite", "resume-auto-restart"])
def test_a_start_refused_by_a_plugin_leaves_the_run_it_would_replace_as_it_was(
    tmp_path: Path, finished: Path, how: tuple[str, ...]
) -> None:
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    before = snapshot(run)
    code, output = cli("run", *COMMON, "--epochs", "1", "--model", "mlp", "-o", "model.hidden=8", "--run-dir", run,
                       "--plugins", "no:checkpoint,freeze", "-o", "freeze.freeze=nope", *how)
    assert code == 2 and one_error(output).startswith("error: freeze.freeze: the model has no module 'nope'"), output
    assert snapshot(run) == before
    # Once the start passes, the run is replaced as asked.
    code, output = cli("run", *COMMON, "--epochs", "1", "--model", "mlp", "-o", "model.hidden=8", "--run-dir", run,
                       "--plugins", "no:checkpoint", "--seed", "1", *how)
    assert code == 0, output
    after = snapshot(run)
    assert sorted(after) == sorted(before) and after["metrics.jsonl"] != before["metrics.jsonl"]
    assert b"seed = 1" in after["config.toml"] and b"seed = 1" not in before["config.toml"]


def test_a_start_refused_in_an_empty_folder_it_was_given_leaves_it_empty(tmp_path: Path) -> None:
    # As a run refused in a folder it made removes that folder: the corrected command then runs there.
    run = tmp_path / "run"
    run.mkdir()
    code, output = cli("run", *COMMON, "--epochs", "1", "--model", "mlp", "-o", "model.hidden=8", "--run-dir", run,
                       "--plugins", "freeze", "-o", "freeze.freeze=nope")
    assert code == 2 and one_error(output).startswith("error: freeze.freeze: the model has no module 'nope'"), output
    assert run.is_dir() and list(run.iterdir()) == []
    code, output = cli("run", *COMMON, "--epochs", "1", "--model", "mlp", "-o", "model.hidden=8", "--run-dir", run)
    assert code == 0, output
