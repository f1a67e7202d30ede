"""Sharded checkpoints: the weights and optimizer state of a sharded model,
written by every rank through ``torch.distributed.checkpoint`` (DCP) beside
the checkpoint file that holds everything else::

    checkpoints/last.pt                   progress, plugins' state, config... and the token below
    checkpoints/last.pt.shards/<token>/   the weights and optimizer state: one file per rank

A save writes a new ``<token>`` folder and only then replaces ``last.pt``, so
the file on disk always names complete shards; folders it no longer names are
removed afterwards.  DCP reads them in any number of processes (resharding as
needed), and in a single process as whole tensors.
"""

from __future__ import annotations

import os
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


def resolve_shards(path: Path, token: object) -> Path:
    """The shards folder that checkpoint ``path`` names by ``token``, checked:
    a name of ours inside the checkpoint's own shards folder, never a path."""
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise UsageError(f"checkpoint {path} names its shards {token!r}, which is not a shards folder this trainer writes")
    folder = shards_root(path) / token
    if not (folder / METADATA).is_file():
        raise UsageError(f"checkpoint {path} is incomplete: its shards folder {folder} is missing or unfinished")
    return folder


def check_layout(payload: Mapping[str, Any], sharding: bool) -> None:
    """Refuse to resume a sharded run's checkpoint in a run that keeps whole weights, or the reverse."""
    if payload.get("shards") is not None and not sharding:
        raise UsageError("the checkpoint holds sharded weights (a --strategy fsdp run's): resume it with --strategy fsdp "
                         "and --nproc-per-node N, or start from its weights with -o model.weights=PATH")
    if payload.get("shards") is None and sharding:
        raise UsageError("the checkpoint holds whole weights and --strategy fsdp shards them: resume it with the strategy "
                         "that wrote it, or start from its weights with -o model.weights=PATH")


def read_shards(folder: Path, state: dict[str, Any]) -> None:
    """Fill ``state`` (tensors of the wanted shapes, sharded or whole) from the
    shards in ``folder``, in place.  Under a process group every rank calls it;
    in one process it reads whole tensors."""
    import torch.distributed.checkpoint as dcp

    from trainer_core.distributed import is_initialized

    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=folder, no_dist=not is_initialized())
    except Exception as exc:  # DCP wraps a rank's failure in its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"the shards in {folder} do not fit this model: {first[:300]}") from None


def read_model_shards(folder: Path, own: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The saved model weights in ``folder`` as whole tensors, for a model whose state dict
    is ``own``: those that fit are read; any other is a ``meta`` tensor of its saved shape."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader

    saved = {key[len("model."):]: meta for key, meta in FileSystemReader(folder).read_metadata().state_dict_metadata.items()
             if key.startswith("model.") and hasattr(meta, "size")}
    fits = {k: torch.empty_like(own[k], device="cpu") for k, meta in saved.items() if k in own and tuple(meta.size) == own[k].shape}
    read_shards(folder, {"model": fits})
    return {k: fits.get(k, torch.empty(tuple(meta.size), dtype=meta.properties.dtype, device="meta")) for k, meta in saved.items()}
