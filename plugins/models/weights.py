"""Starting weights for the built-in models: ``weights=<path>`` (a state dict,
one of our checkpoints, or a run folder: its best checkpoint) and, for
torchvision models, ``weights=imagenet`` from the local torch hub cache."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from trainer_core import (CHECKPOINT_FOLDER, UsageError, find_checkpoint, load_weights, loaded_weights,
                          named_best_checkpoint)

log = logging.getLogger("trainer_core")

HEAD_NAMES = ("fc", "classifier", "head")


def weights_file(path: Path) -> Path:
    """A file as given; for a run folder, its best checkpoint (the one its ``summary.json``
    names, else its only ``checkpoints/best-*.pt``, as ``trainer eval`` takes it), else its
    newest checkpoint."""
    if not path.is_dir():
        return path
    named = named_best_checkpoint(path)
    if named is not None:
        return named
    best = sorted((path / CHECKPOINT_FOLDER).glob("best-*.pt"))
    if len(best) > 1:
        raise UsageError(f"run folder {path} holds {len(best)} best checkpoints ({', '.join(p.name for p in best)}); "
                         f"give weights=<one of those files>")
    return best[0] if best else find_checkpoint(path)


def load_into(model: nn.Module, source: str | Path | Mapping[str, Any], origin: str | None = None,
              strict: bool = True) -> list[str]:
    """Load ``source`` into ``model`` and return the keys it skipped.  A new head (another
    shape, or absent) starts fresh; a grey first convolution is adapted to RGB inputs (and
    the reverse).  With ``strict``, any other tensor that does not fit, either way, is an
    error: a layer left at random would train badly, or stay random if frozen."""
    own = model.state_dict()
    if isinstance(source, Mapping):
        skipped = load_weights(model, source)
        where = origin or "the given state dict"
    else:
        path = weights_file(Path(source))
        skipped = load_weights(model, path)
        where = origin or str(path)
    record = loaded_weights(model)
    unloaded = record.unloaded if record is not None else []
    for key in record.adapted if record is not None else []:
        kind = "grey to RGB" if own[key].shape[1] == 3 else "RGB to grey"
        log.warning("weights from %s: %s adapted from %s (each new input channel gets the mean filter scaled by "
                    "old/new channels, as torchvision-style code adapts them)", where, key, kind)
    head = head_keys(model)
    misfits = sorted(k for k in {*skipped, *unloaded} if k not in head)
    if misfits and strict:
        shown = ", ".join(misfits[:4]) + (f" and {len(misfits) - 4} more" if len(misfits) > 4 else "")
        raise UsageError(f"weights from {where} do not fit this model outside its head: {shown} (another shape, or "
                         f"absent on one side) would keep a random initialisation; give weights saved from this "
                         f"architecture, or -o model.strict=false to train those layers from scratch")
    if skipped or unloaded:
        log.warning("weights from %s: skipped %s (another shape or absent: those layers keep their fresh "
                    "initialisation)", where, ", ".join(sorted({*skipped, *unloaded})))
    return skipped


def find_head(model: nn.Module) -> str | None:
    """The head's module name: ``fc``, ``classifier``, ``head``, or the last ``Linear``; ``None`` without one."""
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return linears[-1] if linears else None


def head_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the head, with those of tensors tied to it (a language model's embedding)."""
    name = find_head(model)
    if name is None:
        return set()
    tensors = {id(t) for t in model.get_submodule(name).state_dict(keep_vars=True).values()}
    return {k for k, t in model.state_dict(keep_vars=True).items() if k.startswith(name + ".") or id(t) in tensors}


def load_local(model: nn.Module, name: str, weights: str, strict: bool = True) -> list[str]:
    """:func:`load_into` for models without published weights: ``imagenet`` is an error."""
    if weights == "imagenet":
        raise ValueError(f"{name} has no ImageNet weights; give weights=<state dict, checkpoint or run folder>, "
                         f"or use a torchvision model such as resnet18")
    return load_into(model, weights, strict=strict)
