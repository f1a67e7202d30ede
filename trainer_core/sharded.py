"""Sharded checkpoints: the weights and optimizer state of a sharded model,
written by every rank through ``torch.distributed.checkpoint`` (DCP) beside
the checkpoint file that holds everything else::

    checkpoints/last.pt                   progress, plugins' state, config... and the token below
    checkpoints/last.pt.shards/<token>/   the weights and optimizer state: one file per rank

A save writes a new ``<token>`` folder and only then replaces ``last.pt``, so
the file on disk always names complete shards; folders it no longer names are
removed afterwards.  DCP reads them in any number of processes (resharding as
needed), and in a single process as whole tensors.

The checkpoint file also records each shards file's SHA-256 (``shard_digests``),
checked whenever it is loaded: DCP's files carry no checksum that anything reads,
so flipped bytes would otherwise load as wrong weights.

The files are read as data only.  DCP itself would unpickle ``.metadata`` and the
non-tensor entries (the optimizer's settings) with plain ``pickle``, which runs
whatever code a crafted file names, and would open any path a file lists: here
``.metadata`` is unpickled with only DCP's own record types allowed, every data
file it lists must be a name DCP writes in the same folder, and the other entries
load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import secrets
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from trainer_core.errors import UsageError

if TYPE_CHECKING:
    import torch

SUFFIX = ".shards"
METADATA = ".metadata"  # what DCP writes last: a folder without it is incomplete
_TOKEN = re.compile(r"[0-9a-f]{16}")
_DATA_FILE = re.compile(r"__\d+_\d+\.distcp")  # DCP's data files: __<rank>_<writer>.distcp


def shards_root(path: Path) -> Path:
    """The folder that holds the shards of checkpoint ``path``."""
    return path.with_name(path.name + SUFFIX)


def new_token() -> str:
    """A fresh name for one save's shards folder."""
    return secrets.token_hex(8)


def write_shards(path: Path, token: str, state: dict[str, Any]) -> None:
    """Write this rank's part of ``state`` to the shards folder ``token`` of
    checkpoint ``path``; every rank calls it (DCP gathers the plan)."""
    import torch.distributed.checkpoint as dcp

    folder = shards_root(path) / token
    folder.mkdir(parents=True, exist_ok=True)
    dcp.save(state, checkpoint_id=folder)


def own_digests(path: Path, token: str, rank: int) -> dict[str, str]:
    """The SHA-256 of each file rank ``rank`` wrote in the shards folder ``token`` of
    checkpoint ``path`` (its data files; rank zero's also ``.metadata``)."""
    folder = shards_root(path) / token
    names = [f.name for f in folder.iterdir() if _DATA_FILE.fullmatch(f.name) and f.name.startswith(f"__{rank}_")]
    return {name: _sha256(folder / name) for name in sorted(names + ([METADATA] if rank == 0 else []))}


def unseen_shards(path: Path, token: str, digests: Mapping[str, str]) -> str | None:
    """Why rank zero cannot see every rank's shards of a save (a folder that is not
    shared between the machines of a run), or ``None``."""
    folder = shards_root(path) / token
    missing = sorted(name for name in digests if not (folder / name).is_file())
    if not missing:
        return None
    return (f"the shards {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} that other processes wrote are not "
            f"in {folder} as rank 0 sees it: --strategy fsdp checkpoints need a --runs-root every machine shares "
            "(a network file system)")


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def link_shards(source: Path, token: str, target: Path) -> None:
    """Give checkpoint ``target`` the shards ``token`` of checkpoint ``source``
    as hard links (a copy where the file system has none): each checkpoint owns
    its folder, so removing one never touches the other's."""
    origin, copy = shards_root(source) / token, shards_root(target) / token
    copy.mkdir(parents=True, exist_ok=True)
    for file in origin.iterdir():
        destination = copy / file.name
        destination.unlink(missing_ok=True)
        try:
            os.link(file, destination)
        except OSError:
            shutil.copy2(file, destination)


def drop_stale_shards(path: Path, keep: str | None) -> None:
    """Remove the shards folders of checkpoint ``path`` other than ``keep``
    (``None``: all of them): only folders named as this module names them."""
    root = shards_root(path)
    if not root.is_dir():
        return
    for child in root.iterdir():
        if child.is_dir() and _TOKEN.fullmatch(child.name) and child.name != keep:
            shutil.rmtree(child)
    if keep is None and not any(root.iterdir()):
        root.rmdir()


def resolve_shards(path: Path, token: object, digests: object = None) -> Path:
    """The shards folder that checkpoint ``path`` names by ``token``, checked:
    a name of ours inside the checkpoint's own shards folder, never a path, whose
    files have the ``digests`` recorded when it was saved (``None``: a checkpoint
    written before they were recorded)."""
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise UsageError(f"checkpoint {path} names its shards {token!r}, which is not a shards folder this trainer writes")
    folder = shards_root(path) / token
    if not (folder / METADATA).is_file():
        raise UsageError(f"checkpoint {path} is incomplete: its shards folder {folder} is missing or unfinished")
    if digests is not None:
        _check_digests(path, folder, digests)
    return folder


def _check_digests(path: Path, folder: Path, digests: object) -> None:
    if not (isinstance(digests, dict) and METADATA in digests
            and all(isinstance(k, str) and (k == METADATA or _DATA_FILE.fullmatch(k)) and isinstance(v, str)
                    for k, v in digests.items())):
        raise UsageError(f"checkpoint {path} records its shards' digests in a form this trainer does not write")
    unrecorded = sorted({f.name for f in folder.iterdir() if _DATA_FILE.fullmatch(f.name)} - digests.keys())
    if unrecorded:
        raise UsageError(f"checkpoint {path}'s shards folder holds {unrecorded[0]}, which the checkpoint does not record")
    for name, expected in sorted(digests.items()):
        if not (folder / name).is_file():
            raise UsageError(f"checkpoint {path} is incomplete: its shard {folder / name} is missing")
        if _sha256(folder / name) != expected:
            raise UsageError(f"checkpoint {path}'s shard {folder / name} is damaged: its SHA-256 differs from the one "
                             "recorded when it was saved")


def check_layout(payload: Mapping[str, Any], sharding: bool) -> None:
    """Refuse to resume a sharded run's checkpoint in a run that keeps whole weights, or the reverse."""
    if payload.get("shards") is not None and not sharding:
        raise UsageError("the checkpoint holds sharded weights (a --strategy fsdp run's): resume it with --strategy fsdp "
                         "and --nproc-per-node N, or start from its weights with -o model.weights=PATH")
    if payload.get("shards") is None and sharding:
        raise UsageError("the checkpoint holds whole weights and --strategy fsdp shards them: resume it with the strategy "
                         "that wrote it, or start from its weights with -o model.weights=PATH")


# The record types of torch.distributed.checkpoint.metadata that a .metadata file holds.
_RECORDS = frozenset({"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                      "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"})


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata``: its record types, tensor sizes, dtypes and layouts, nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        import torch
        import torch.distributed.checkpoint.metadata as records

        if module == records.__name__ and name in _RECORDS:
            return getattr(records, name)
        if (module, name) in (("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                              ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which DCP's metadata never holds")


def _metadata(folder: Path) -> Any:
    """The DCP metadata of ``folder``, read as data and checked (see the module's docstring)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata

    where = folder / METADATA
    try:
        metadata = _MetadataUnpickler(io.BytesIO(where.read_bytes())).load()
    except Exception as exc:
        raise UsageError(f"the shards' {where} is not DCP metadata this trainer reads: {exc}") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise UsageError(f"the shards' {where} is not DCP metadata this trainer reads")
    for info in metadata.storage_data.values():
        if not (isinstance(info, _StorageInfo) and isinstance(info.relative_path, str)
                and _DATA_FILE.fullmatch(info.relative_path) and not info.transform_descriptors
                and all(isinstance(n, int) and n >= 0 for n in (info.offset, info.length))):
            raise UsageError(f"the shards' {where} lists data that is not a shard file of its folder: "
                             f"{getattr(info, 'relative_path', info)!r}")
    return metadata


def _reader(folder: Path) -> Any:
    """A DCP reader of ``folder`` that gives DCP the metadata :func:`_metadata` read."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    metadata = _metadata(folder)

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata.storage_meta = StorageMeta(load_id=self.load_id)
            return metadata

    return Reader(folder)


def _planner() -> Any:
    """DCP's default plan, with the non-tensor entries (the optimizer's settings) loaded as data only."""
    import torch
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.planner import ReadItem

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
            loaded = torch.load(value, weights_only=True)  # (DCP's own: weights_only=False, any code a file names)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return Planner()


def read_shards(folder: Path, state: dict[str, Any], *, alone: bool = False) -> None:
    """Fill ``state`` (tensors of the wanted shapes, sharded or whole) from the
    shards in ``folder``, in place.  Under a process group every rank calls it,
    unless ``alone``: then this process reads whole tensors by itself (as one
    without a process group does)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from trainer_core.distributed import is_initialized

    reader = _reader(folder)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=reader, planner=_planner(), no_dist=alone or not is_initialized())
    except (Exception, CheckpointException) as exc:  # (a BaseException: DCP's wrapper of every rank's failure)
        if isinstance(exc, CheckpointException) and exc.failures:
            exc = next(iter(exc.failures.values()))[0]
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"the shards in {folder} cannot be read into this model: {first[:300]}") from None


def read_model_shards(folder: Path, own: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The saved model weights in ``folder`` as whole tensors in CPU memory, read by this
    process alone (also under a process group: rank zero's plugins call it), for a model
    whose state dict is ``own`` (whole or sharded): those that fit are read; any other is a
    ``meta`` tensor of its saved shape."""
    import torch

    saved = {key[len("model."):]: meta for key, meta in _metadata(folder).state_dict_metadata.items()
             if key.startswith("model.") and hasattr(meta, "size")}
    fits = {k: torch.empty(tuple(meta.size), dtype=own[k].dtype) for k, meta in saved.items()
            if k in own and tuple(meta.size) == own[k].shape}
    read_shards(folder, {"model": fits}, alone=True)
    return {k: fits.get(k, torch.empty(tuple(meta.size), dtype=meta.properties.dtype, device="meta")) for k, meta in saved.items()}
