"""Weights as a safetensors file: what ``trainer export --format safetensors``
writes and what ``trainer eval``/``predict`` and ``-o model.weights=`` read.

The file is the model's state dict in the `safetensors` format (no pickle:
loading it runs no code), with a small JSON under the header's
``__metadata__["trainer.json"]``: the model's and dataset's names and options,
the task, the class names, the input shape and normalisation, the epoch, and a
SHA-256 of the tensor data (safetensors stores no checksum of its own, so
flipped bytes would otherwise load as wrong weights).  One file rather than a
weights file and a JSON beside it: nothing to lose or mismatch when it is
copied.  Any program reads it with the ``safetensors`` package alone::

    from safetensors import safe_open
    from safetensors.torch import load_file
    weights = load_file("model.safetensors")
    info = json.loads(safe_open("model.safetensors", "pt").metadata()["trainer.json"])

Nothing read from the JSON chooses a path or names code to run: it holds
registered names and their options, which the reader checks like a TOML config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from trainer_core.errors import UsageError

if TYPE_CHECKING:
    import torch

    from trainer_core.config import RunConfig
    from trainer_core.data import DataBundle
    from trainer_core.task import Task

#: Key of the trainer's JSON in the safetensors header's ``__metadata__``.
METADATA_KEY = "trainer.json"
SUFFIX = ".safetensors"
_MAX_HEADER = 100_000_000  # the safetensors library's own limit on the header's size


@dataclasses.dataclass
class SafetensorsFile:
    """What :func:`read_safetensors` found in a file.

    :ivar weights: the tensors, keyed as the model's ``state_dict()``.
    :ivar info: the trainer's JSON (``trainer export`` writes it), or ``None``
        for a safetensors file written by another program.
    """

    weights: dict[str, torch.Tensor]
    info: dict[str, Any] | None


def is_safetensors(path: Path) -> bool:
    """Whether ``path`` is meant as a safetensors file: its name ends in
    ``.safetensors``, or it starts as one (an 8-byte header length, then ``{``)."""
    path = Path(path)
    if path.suffix == SUFFIX:
        return True
    try:
        with open(path, "rb") as handle:
            start = handle.read(9)
    except OSError:
        return False
    return len(start) == 9 and start[8:9] == b"{" and 0 < int.from_bytes(start[:8], "little") < _MAX_HEADER


def write_safetensors(path: Path, weights: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> None:
    """Write ``weights`` (on the CPU, each a tensor of its own: tied weights
    are stored twice, so any loader finds every key) and the JSON ``info``
    with the data's SHA-256 to ``path``, atomically."""
    from safetensors.torch import save

    from trainer_core.files import atomic_write_bytes

    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in weights.items()}
    first = save(tensors, metadata={METADATA_KEY: json.dumps(dict(info))})
    # The data part does not depend on the header, so its digest can go into a second header.
    digest = hashlib.sha256(_data(first)).hexdigest()
    atomic_write_bytes(Path(path), save(tensors, metadata={METADATA_KEY: json.dumps({**info, "sha256": digest})}))


def read_safetensors(path: Path) -> SafetensorsFile:
    """Read a safetensors file: its tensors, and the trainer's JSON if it has one
    (whose SHA-256 of the data is then checked).  Anything wrong is a one-line
    :class:`~trainer_core.UsageError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"{path} cannot be read: {exc.strerror or exc}") from None
    damaged = f"{path} is damaged or not a safetensors file"
    try:
        size = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + size]) if 8 <= len(raw) and size <= len(raw) - 8 else None
        weights = load(raw)
    except (SafetensorError, ValueError, RuntimeError) as exc:  # (a JSON error is a ValueError)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{damaged}: {first}") from None
    if not isinstance(header, dict):
        raise UsageError(f"{damaged}: its header is not a JSON object")
    text = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if text is None:
        return SafetensorsFile(weights, None)
    try:
        info = json.loads(text)
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise UsageError(f"{damaged}: its {METADATA_KEY} is not a JSON object; export the model again")
    if info.get("sha256") != hashlib.sha256(_data(raw)).hexdigest():
        raise UsageError(f"{damaged}: its tensor data does not match the SHA-256 its {METADATA_KEY} records "
                         "(changed since it was written); export the model again")
    return SafetensorsFile(weights, info)


def _data(raw: bytes) -> bytes:
    """The tensor data of a safetensors file's bytes (everything after the header)."""
    return raw[8 + int.from_bytes(raw[:8], "little"):]


def export_info(config: RunConfig, data: DataBundle, task: Task, epoch: int | None, step: int | None) -> dict[str, Any]:
    """The JSON stored with exported weights: what rebuilds their model
    (registered names and options; the ``weights`` option, a path, left out)
    and what checks that a dataset fits them."""
    return {
        "model": config.model,
        "model_options": {k: v for k, v in config.model_options.items() if k != "weights"},
        "dataset": config.dataset,
        "dataset_options": dict(config.dataset_options),
        "task": task.name,
        "task_options": dict(config.task_options),
        "task_state": task.state_dict(),
        "classes": [str(c) for c in data.classes],
        "input_shape": list(data.input_shape),
        "mean": list(data.mean) if data.mean is not None else None,
        "std": list(data.std) if data.std is not None else None,
        "epoch": epoch,
        "step": step,
    }


def as_checkpoint(path: Path) -> dict[str, Any]:
    """A file ``trainer export --format safetensors`` wrote, as the payload of a
    checkpoint (``config``, ``model``, ``task``, ``state``) that
    :func:`~trainer_core.trained.load_trained` rebuilds a model from, plus
    ``expects``: the classes and input shape the dataset must have."""
    found = read_safetensors(path)
    if found.info is None:
        raise UsageError(f"{path} holds weights without the {METADATA_KEY} that trainer export writes, so there is no "
                         f"model to rebuild; start a run from them with -o model.weights={path}")
    info, key = found.info, ""
    try:
        config = {}
        for owner in ("model", "dataset", "task"):
            key = owner
            name = _name(info[key])
            key = f"{owner}_options"
            config[owner] = {"name": name, **_options(info[key])}
        key = "task_state"
        task_state = _options(info[key])
        key = "classes"
        classes = _list(info[key], lambda c: isinstance(c, str))
        key = "input_shape"
        shape = _list(info[key], lambda n: isinstance(n, int) and not isinstance(n, bool) and n > 0)
        if not shape:
            raise TypeError
        key = "epoch"
        epoch, step = (info.get(k) if isinstance(info.get(k), int) else None for k in ("epoch", "step"))
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"{path}: its {METADATA_KEY} lacks or garbles '{key}'; export the model again") from None
    return {"config": config, "model": found.weights, "task": task_state, "state": {"epoch": epoch, "step": step or 0},
            "expects": {"classes": classes, "input_shape": shape}}


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError
    return value


def _list(value: Any, fits: Callable[[Any], bool]) -> list[Any]:
    if not isinstance(value, list) or not all(fits(item) for item in value):
        raise TypeError
    return value


def _options(value: Any) -> dict[str, Any]:
    """A table of plain options: text keys, values that are numbers, text, booleans, null or lists of them."""
    plain = (str, int, float, bool, type(None))
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise TypeError
    for item in value.values():
        if not isinstance(item, plain) and not (isinstance(item, list) and all(isinstance(i, plain) for i in item)):
            raise TypeError
    return value
