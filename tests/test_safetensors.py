"""trainer export --format safetensors, and eval / predict / -o model.weights= reading it (issue 16, item 3)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from trainer_core import RunConfig
from trainer_core.runner import build_run
from trainer_core.safetensors_file import METADATA_KEY

from test_commands import invoke, one_line_error


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A one-epoch digits run (a narrow smallcnn), its checkpoint, and its weights exported as safetensors."""
    root = tmp_path_factory.mktemp("exported")
    config = RunConfig(dataset="digits", epochs=1, plugins={}, device="cpu", run_dir=str(root / "run"),
                       model_options={"width": 8})
    trainer = build_run(config)
    trainer.fit()
    checkpoint = root / "run" / "checkpoints" / "last.pt"
    trainer.save_checkpoint(checkpoint)
    output = root / "model.safetensors"
    code, text = invoke("export", "--checkpoint", checkpoint, "--format", "safetensors", "--output", output)
    assert code == 0, text
    assert text.startswith(f"wrote {output} (safetensors) from {checkpoint}")
    return {"root": root, "checkpoint": checkpoint, "file": output, "trainer": trainer}


def craft(path: Path, tensors: dict[str, torch.Tensor], info: dict | None) -> Path:
    """A safetensors file with ``info`` as its trainer.json, its digest made right (so only ``info`` is odd)."""
    if info is None:
        save_file(tensors, str(path))
        return path
    first = save(tensors, metadata={METADATA_KEY: json.dumps(info)})
    data = first[8 + int.from_bytes(first[:8], "little"):]
    path.write_bytes(save(tensors, metadata={METADATA_KEY: json.dumps({**info, "sha256": hashlib.sha256(data).hexdigest()})}))
    return path


def info_of(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as opened:
        return json.loads(opened.metadata()[METADATA_KEY])


READER = textwrap.dedent("""
    import json, sys
    from safetensors import safe_open
    from safetensors.numpy import load_file
    weights = load_file(sys.argv[1])
    with safe_open(sys.argv[1], "np") as opened:
        info = json.loads(opened.metadata()["trainer.json"])
    print(json.dumps({"keys": sorted(weights), "sum": float(sum(w.sum() for w in weights.values())), "info": info,
                      "torch": "torch" in sys.modules}))
""")


def test_the_file_loads_with_the_safetensors_package_alone(exported: dict, tmp_path: Path) -> None:
    """Another program, without torch or trainer-core: the weights, and the model, options, classes and task."""
    (tmp_path / "reader.py").write_text(READER)
    done = subprocess.run([sys.executable, "-I", str(tmp_path / "reader.py"), str(exported["file"])],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    state = exported["trainer"].model.state_dict()
    assert found["keys"] == sorted(state) and not found["torch"]
    assert found["sum"] == pytest.approx(float(sum(v.double().sum() for v in state.values())), rel=1e-6)
    info = found["info"]
    assert (info["model"], info["model_options"], info["dataset"], info["task"]) == ("smallcnn", {"width": 8}, "digits",
                                                                                     "classification")
    assert info["classes"] == list("0123456789") and info["input_shape"] == [1, 8, 8] and info["epoch"] == 1
    assert len(info["sha256"]) == 64


def test_eval_and_predict_read_it_as_they_read_the_checkpoint(exported: dict, tmp_path: Path) -> None:
    from PIL import Image

    from trainer_core_plugins.datasets.digits import load

    results = [json.loads(invoke("eval", "--checkpoint", source, "--json")[1])
               for source in (exported["checkpoint"], exported["file"])]
    assert results[1]["checkpoint"] == str(exported["file"])
    for key in ("metrics", "confusion_matrix", "model", "dataset", "epoch", "samples"):
        assert results[1][key] == results[0][key], key
    paths = []
    for index, image in enumerate(load().val.inputs[:4]):
        paths.append(tmp_path / f"digit{index}.png")
        Image.fromarray((image[0] * 255).round().byte().numpy(), "L").save(paths[-1])
    predicted = [json.loads(invoke("predict", "--checkpoint", source, *paths, "--json")[1])
                 for source in (exported["checkpoint"], exported["file"])]
    assert predicted[0] == predicted[1] and len(predicted[0]) == 4


def test_a_run_starts_from_it_with_model_weights(exported: dict, tmp_path: Path) -> None:
    """Ours, and a bare state dict another program wrote as safetensors."""
    state = exported["trainer"].model.state_dict()
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.clone() for k, v in state.items()}, str(bare))
    for source in (exported["file"], bare):
        config = RunConfig(dataset="digits", epochs=1, plugins={}, device="cpu", model_options={"width": 8,
                           "weights": str(source)})
        trainer = build_run(config, write_files=False)
        assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in state.items()), source


def test_damage_is_a_one_line_error(exported: dict, tmp_path: Path) -> None:
    raw = exported["file"].read_bytes()
    flipped = bytearray(raw)
    flipped[-5] ^= 0x40  # a byte of the last tensor's data
    (tmp_path / "flipped.safetensors").write_bytes(bytes(flipped))
    one_line_error(*invoke("eval", "--checkpoint", tmp_path / "flipped.safetensors"), "SHA-256", "export the model again")
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    one_line_error(*invoke("eval", "--checkpoint", tmp_path / "cut.safetensors"), "is damaged or not a safetensors file")
    (tmp_path / "text.safetensors").write_text("not weights")
    one_line_error(*invoke("predict", "--checkpoint", tmp_path / "text.safetensors", "x.png"), "not a safetensors file")
    code, output = invoke("run", "--dataset", "digits", "--epochs", "1", "-o", "model.width=8", "-q",
                          "-o", f"model.weights={tmp_path / 'cut.safetensors'}", "--run-dir", tmp_path / "run")
    one_line_error(code, output, "cut.safetensors", "not a safetensors file")
    assert not (tmp_path / "run").exists()


def test_mismatches_are_one_line_errors(exported: dict, tmp_path: Path) -> None:
    tensors = {k: v.clone() for k, v in exported["trainer"].model.state_dict().items()}
    info = info_of(exported["file"])
    bare = craft(tmp_path / "bare.safetensors", tensors, None)
    one_line_error(*invoke("eval", "--checkpoint", bare), "without the trainer.json", "model.weights=")
    other = craft(tmp_path / "other.safetensors", tensors, {**info, "classes": [f"c{i}" for i in range(10)]})
    one_line_error(*invoke("eval", "--checkpoint", other), "exported for 10 classes (c0, c1", "this dataset has 10 (0, 1")
    wider = craft(tmp_path / "wider.safetensors", tensors, {**info, "model_options": {"width": 16}})
    one_line_error(*invoke("eval", "--checkpoint", wider), "do not fit model 'smallcnn'")
    for key, value in (("task", 3), ("model_options", {"width": {"nested": 1}}), ("classes", "0123456789")):
        garbled = craft(tmp_path / f"{key}.safetensors", tensors, {**info, key: value})
        one_line_error(*invoke("eval", "--checkpoint", garbled), f"garbles '{key}'")


def test_nothing_in_its_json_chooses_a_path(exported: dict, tmp_path: Path) -> None:
    """A path in the model's options is never read; no other setting is taken from the file."""
    tensors = {k: v.clone() for k, v in exported["trainer"].model.state_dict().items()}
    info = info_of(exported["file"])
    missing = tmp_path / "nowhere" / "weights.pt"
    pointing = craft(tmp_path / "pointing.safetensors", tensors, {**info, "model_options": {"width": 8, "weights": str(missing)},
                                                                   "data_root": str(tmp_path / "elsewhere")})
    code, output = invoke("eval", "--checkpoint", pointing, "--json")
    assert code == 0, output
    assert json.loads(output)["metrics"] == json.loads(invoke("eval", "--checkpoint", exported["file"], "--json")[1])["metrics"]
    rooted = craft(tmp_path / "rooted.safetensors", tensors, {**info, "dataset_options": {"data_root": "/etc"}})
    one_line_error(*invoke("eval", "--checkpoint", rooted), "unknown option 'dataset.data_root'")
