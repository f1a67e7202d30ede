"""Checkpoint files: written atomically, read without running code from them."""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Mapping

from trainer_core.errors import TrainerError, UsageError
from trainer_core.files import atomic_write_with
from trainer_core.sharded import drop_stale_shards, read_model_shards, resolve_shards, shards_root

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions: the checkpoint plugin imports this
# module, and `trainer plugins` must list plugins without loading torch.

log = logging.getLogger("trainer_core")

CHECKPOINT_FOLDER = "checkpoints"
LAST_CHECKPOINT = "last.pt"  # the newest state of a run, what ``--resume`` continues from
FORMAT = 1


def save_checkpoint(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` to ``path`` through a temporary file; the previous
    file at ``path`` stays intact if anything fails."""
    import torch

    sink = _Sink()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_with(path, lambda handle: torch.save(dict(payload), sink.wrap(handle)))
    except (OSError, RuntimeError) as exc:  # a full disk, a read-only folder
        cause = sink.error or exc
        if not isinstance(cause, OSError):
            raise
        raise TrainerError(
            f"cannot write checkpoint {path}: {cause.strerror or cause}; the previous checkpoints are intact"
        ) from None


class _Sink:
    """A file wrapper that remembers the write error, which ``torch.save``
    reports only as an opaque RuntimeError ("unexpected pos ...")."""

    def __init__(self) -> None:
        self.error: OSError | None = None
        self._handle: BinaryIO | None = None

    def wrap(self, handle: BinaryIO) -> _Sink:
        self._handle = handle
        return self

    def write(self, data: bytes) -> int:
        assert self._handle is not None
        try:
            return self._handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        assert self._handle is not None
        self._handle.flush()


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``: tensors and plain data only."""
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    import torch

    magic = _magic(path)
    # torch.save writes a zip archive ("PK"), older versions a bare pickle (which starts with 0x80).
    if magic != b"PK" and magic[:1] != b"\x80":
        raise UsageError(f"checkpoint {path} is not a checkpoint (not a file torch.save writes)")
    if magic == b"PK":
        damage = archive_damage(path)
        if damage:
            raise UsageError(f"checkpoint {path} is damaged or not a checkpoint: {damage}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"checkpoint {path} was refused: it holds objects other than tensors and plain data, "
            f"and loading it could run code ({first})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        # torch's own text runs to several sentences: the first says what broke.
        reason = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"checkpoint {path} is damaged or not a checkpoint: {reason}") from None
    if not isinstance(payload, dict):
        raise UsageError(f"checkpoint {path} does not hold a checkpoint (found {type(payload).__name__})")
    if "format" in payload:  # ours (a plain state dict is tensors by name): the parts every reader takes as tables
        for key in ("state", "config", "task", "plugins", "optimizer", "stepper"):
            if payload.get(key) is not None and not isinstance(payload[key], Mapping):
                raise UsageError(f"checkpoint {path} is damaged: its '{key}' is {type(payload[key]).__name__}, not a table")
    weights = payload.get("model")
    if isinstance(weights, Mapping):  # ours: the weights by name (a plain state dict may name a tensor "model")
        bad = [k for k, v in weights.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise UsageError(f"checkpoint {path} is damaged: its 'model' holds {type(weights[bad[0]]).__name__} under "
                             f"{bad[0]!r}, not a tensor")
    elif weights is not None and not isinstance(weights, torch.Tensor):
        raise UsageError(f"checkpoint {path} is damaged: its 'model' is {type(weights).__name__}, not weights by name")
    if payload.get("shards") is not None:  # a sharded model's: its weights are in a folder beside it
        payload["shards"] = resolve_shards(path, payload["shards"], payload.get("shard_digests"))
    return payload


def checkpoint_weights(payload: Mapping[str, Any], model: torch.nn.Module) -> Mapping[str, Any]:
    """The model weights of a loaded checkpoint, keyed as ``model.state_dict()``: those it
    holds, or those in its shards (a sharded run's), read as whole tensors in this process.
    From shards, a weight whose shape differs from ``model``'s, or that ``model`` lacks,
    is a data-less ``meta`` tensor of the saved shape (it cannot load, and says why)."""
    if payload.get("shards") is None:
        return payload["model"]
    return read_model_shards(payload["shards"], model.state_dict())


def remove_checkpoint(path: Path) -> None:
    """Delete checkpoint ``path`` and its shards, if it has any."""
    path.unlink(missing_ok=True)
    drop_stale_shards(path, keep=None)


def _magic(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(2)


def archive_damage(path: Path) -> str | None:
    """What is wrong with the zip archive ``torch.save`` wrote at ``path``, or ``None``.

    ``torch.load`` does not check the CRC-32 the archive stores for each of its records,
    so flipped bytes would load as wrong weights; reading every record checks them all."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"record {bad} fails its checksum" if bad is not None else None


def named_best_checkpoint(run: Path) -> Path | None:
    """The best checkpoint that run folder ``run``'s ``summary.json`` names (what the
    checkpoint plugin kept as best), if it is a file in that folder (what a file says
    never leads elsewhere); ``None`` otherwise."""
    import json

    from trainer_core.rundir import SUMMARY

    try:
        named = json.loads((run / SUMMARY).read_text(encoding="utf-8")).get("checkpoints", {}).get("best")
    except (OSError, ValueError, AttributeError):  # no summary (a run killed or still running), or not ours
        return None
    if not isinstance(named, str) or not named:
        return None
    path, folder = (run / named).resolve(), run.resolve()
    return run / named if path.is_relative_to(folder) and path != folder and path.is_file() else None


def find_checkpoint(path: Path) -> Path:
    """A checkpoint file as given, or the newest complete one in a run folder
    (or in its ``checkpoints`` folder)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise UsageError(f"--resume {path}: no such file or run folder")
    found = newest_checkpoint(path)
    if found is None:
        folder = path / CHECKPOINT_FOLDER if (path / CHECKPOINT_FOLDER).is_dir() else path
        raise UsageError(f"--resume {path}: no checkpoint in {folder}; enable the checkpoint plugin to write them")
    return found


def newest_checkpoint(run_path: Path) -> Path | None:
    """The most recently written undamaged checkpoint of a run folder (or of a
    folder of checkpoints), or ``None`` when it holds none.  A damaged newer one
    (see :func:`archive_damage`) is passed over with a warning."""
    folder = run_path / CHECKPOINT_FOLDER if (run_path / CHECKPOINT_FOLDER).is_dir() else run_path
    # Temporary files of an interrupted save start with a dot and are never candidates.
    found = [p for p in folder.glob("*.pt") if not p.name.startswith(".") and p.is_file()] if folder.is_dir() else []
    for path in sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True):
        damage = archive_damage(path) if _magic(path) == b"PK" else None
        if damage is None and shards_root(path).is_dir():  # a sharded run's (a small file): its shards checked too
            try:
                load_checkpoint(path)
            except UsageError as exc:
                damage = str(exc)
        if damage is None:
            return path
        log.warning("checkpoint %s is damaged (%s); passing over it to an older one", path, damage)
    return None


def describe_misfit(own: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor]) -> str:
    """Why a checkpoint's weights do not load into a model, for a resume."""
    return (f"checkpoint does not fit this model ({misfit_details(own, saved)}): resume with the same model and classes, "
            "or start from its weights with a new head with -o model.weights=PATH")


def misfit_details(own: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor]) -> str:
    """The keys of two state dicts that differ, a few of each kind."""
    shapes = [f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in saved and saved[k].shape != v.shape]
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    parts = [f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
             for label, keys in (("shape in checkpoint vs model", shapes), ("missing", missing), ("unexpected", unexpected)) if keys]
    return "; ".join(parts)


def load_weights(model: torch.nn.Module, source: Path | Mapping[str, Any]) -> list[str]:
    """Load weights for transfer learning: from a state-dict file, one of our
    checkpoints, a safetensors file, or a state dict already in memory.

    Keys whose shape does not match the model (a new classifier head) or that
    the model lacks are skipped and returned; the rest are loaded.  Missing
    every key means the file is for another model: that is an error.  A grey
    model's first convolution is adapted to an RGB one (and the reverse); what
    was loaded, adapted and left fresh is recorded on the model with the input
    normalisation our checkpoints carry (:func:`~trainer_core.loaded_weights`).
    """
    from trainer_core.safetensors_file import is_safetensors, read_safetensors
    from trainer_core.transfer import LoadedWeights, Normalization, adapt_input_channels, record_loaded

    normalization = None
    if isinstance(source, Mapping):
        weights = source
        where = "the given state dict"
    elif is_safetensors(Path(source)):  # any program's; trainer export's JSON says what inputs they were trained on
        found = read_safetensors(Path(source))
        weights = found.weights
        normalization = Normalization.read({k: v for k, v in (found.info or {}).items() if k in ("mean", "std")})
        where = str(source)
    else:
        payload = load_checkpoint(Path(source))
        is_ours = isinstance(payload.get("model"), Mapping) or payload.get("shards") is not None
        weights = checkpoint_weights(payload, model) if is_ours else payload
        normalization = Normalization.read(payload.get("normalization")) if is_ours else None
        where = str(source)
    own = model.state_dict()
    adapted = adapt_input_channels(own, weights)
    usable = {k: v for k, v in {**weights, **adapted}.items() if k in own and getattr(v, "shape", None) == own[k].shape}
    skipped = sorted(k for k in weights if k not in usable)
    if not usable:
        sample = ", ".join(skipped[:3])
        raise UsageError(f"no weights in {where} fit this model (first keys: {sample}); was it saved from another model?")
    model.load_state_dict(usable, strict=False)
    # Batch norm's step counters are no learned weights: many published files leave them out.
    unloaded = [k for k in own if k not in usable and not k.endswith(".num_batches_tracked")]
    record_loaded(model, LoadedWeights(where, unloaded, sorted(adapted), normalization))
    return skipped
