"""torchvision's dataset downloaders, for ``download=true``, with a failure (no
network, a moved file) reported as one line that says what to do instead."""

from __future__ import annotations

from pathlib import Path

from trainer_core import UsageError


def torchvision_download(dataset_class: str, root: Path, name: str, remedy: str) -> None:
    """Download ``torchvision.datasets.<dataset_class>`` into ``root`` (its training
    split fetches every file); ``remedy`` says how to get the files by hand."""
    import torchvision.datasets

    try:
        getattr(torchvision.datasets, dataset_class)(root=str(root), train=True, download=True)
    except Exception as exc:  # network errors come in many types; the message is what matters
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise UsageError(f"{name}: download into {root} failed ({reason}); {remedy}") from None
