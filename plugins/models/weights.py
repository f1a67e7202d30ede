"""Starting weights for the built-in models: ``weights=<path>`` (a state dict,
one of our checkpoints, or a run folder: its best checkpoint) and, for
torchvision models, ``weights=imagenet`` from the local torch hub cache."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from trainer_core import CHECKPOINT_FOLDER, UsageError, find_checkpoint, load_weights

log = logging.getLogger("trainer_core")


def weights_file(path: Path) -> Path:
    """A file as given; for a run folder, its best checkpoint (``checkpoints/best-*.pt``,
    which the checkpoint plugin writes) when there is exactly one, else its newest checkpoint."""
    if not path.is_dir():
        return path
    best = sorted((path / CHECKPOINT_FOLDER).glob("best-*.pt"))
    if len(best) > 1:
        raise UsageError(f"run folder {path} holds {len(best)} best checkpoints ({', '.join(p.name for p in best)}); "
                         f"give weights=<one of those files>")
    return best[0] if best else find_checkpoint(path)


def load_into(model: nn.Module, source: str | Path | Mapping[str, Any], origin: str | None = None) -> list[str]:
    """Load ``source`` into ``model`` (shapes that differ, such as a new head,
    are skipped) and report what was skipped on the log; return those keys."""
    if isinstance(source, Mapping):
        skipped = load_weights(model, source)
        where = origin or "the given state dict"
    else:
        path = weights_file(Path(source))
        skipped = load_weights(model, path)
        where = origin or str(path)
    if skipped:
        log.warning("weights from %s: skipped %s (another shape or not in this model: those layers keep "
                    "their fresh initialisation)", where, ", ".join(skipped))
    return skipped


def load_local(model: nn.Module, name: str, weights: str) -> list[str]:
    """:func:`load_into` for models without published weights: ``imagenet`` is an error."""
    if weights == "imagenet":
        raise ValueError(f"{name} has no ImageNet weights; give weights=<state dict, checkpoint or run folder>, "
                         f"or use a torchvision model such as resnet18")
    return load_into(model, weights)
