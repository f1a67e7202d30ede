"""What a model's starting weights brought with them: which tensors they did
not provide, which were adapted, and the input normalisation they were trained
with (so a run that feeds them other inputs hears of it)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    import torch
    from torch import nn

    from trainer_core.data import DataBundle

log = logging.getLogger("trainer_core")

# The attribute of a model that load_weights records its LoadedWeights in: the
# model is the one thing the weights' loader, the run and the plugins all see.
_RECORD = "_trainer_core_loaded_weights"


@dataclass
class Normalization:
    """How inputs were normalised: per channel (or feature) ``mean`` and ``std``,
    both ``None`` for none (images scaled to [0, 1] only)."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @classmethod
    def of(cls, data: DataBundle) -> Normalization:
        """The normalisation the core applies to ``data``'s batches."""
        if data.mean is None or data.std is None:
            return cls()
        return cls(tuple(float(m) for m in data.mean), tuple(float(s) for s in data.std))

    @classmethod
    def read(cls, recorded: object) -> Normalization | None:
        """What a checkpoint recorded (:meth:`to_dict`), or ``None`` when it recorded nothing usable."""
        if not isinstance(recorded, Mapping) or set(recorded) != {"mean", "std"}:
            return None
        values = [recorded["mean"], recorded["std"]]
        if values == [None, None]:
            return cls()
        if not all(isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) for x in v) for v in values):
            return None
        return cls(tuple(float(x) for x in values[0]), tuple(float(x) for x in values[1]))

    def to_dict(self) -> dict[str, list[float] | None]:
        return {"mean": list(self.mean) if self.mean is not None else None,
                "std": list(self.std) if self.std is not None else None}

    def matches(self, other: Normalization) -> bool:
        """Equal up to rounding; a single grey channel matches RGB ones of its value on average (adapted weights)."""
        if (self.mean is None) != (other.mean is None):
            return False
        if self.mean is None or other.mean is None or self.std is None or other.std is None:
            return True
        return _close(self.mean, other.mean) and _close(self.std, other.std)

    def describe(self) -> str:
        if self.mean is None or self.std is None:
            return "no normalisation (images scaled to [0, 1] only)"
        return f"mean {_numbers(self.mean)} std {_numbers(self.std)}"


@dataclass
class LoadedWeights:
    """What :func:`~trainer_core.load_weights` loaded into a model.

    :ivar source: where the weights came from, in words.
    :ivar unloaded: the model's state-dict entries the weights did not provide
        (they keep their fresh initialisation), e.g. a new head.
    :ivar adapted: entries loaded after adapting them (a grey first convolution for RGB inputs).
    :ivar normalization: the input normalisation the weights were trained with, when their file says.
    """

    source: str
    unloaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    normalization: Normalization | None = None


def loaded_weights(model: nn.Module) -> LoadedWeights | None:
    """What :func:`~trainer_core.load_weights` last loaded into ``model``, or ``None``
    when the model was built without starting weights."""
    record = model.__dict__.get(_RECORD)
    return record if isinstance(record, LoadedWeights) else None


def record_loaded(model: nn.Module, record: LoadedWeights) -> None:
    model.__dict__[_RECORD] = record


def adapt_input_channels(own: Mapping[str, torch.Tensor], weights: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model's first convolution's weight from weights of a grey model for an
    RGB one (or the reverse), when that is the only way they differ: each new input
    channel gets the mean of the old filters scaled by old/new channels, as
    torchvision-style code adapts ImageNet weights (grey to RGB: the filter repeated
    over R, G and B and divided by 3, so a grey image in RGB gives the same response)."""
    first = next((k for k, v in own.items() if v.dim() == 4 and v.is_floating_point()), None)
    if first is None or first not in weights:
        return {}
    old, new = weights[first], own[first]
    if getattr(old, "dim", lambda: 0)() != 4 or old.shape[1] == new.shape[1]:
        return {}
    if {old.shape[1], new.shape[1]} != {1, 3} or (old.shape[0], *old.shape[2:]) != (new.shape[0], *new.shape[2:]):
        return {}
    adapted = old.mean(1, keepdim=True).repeat(1, new.shape[1], 1, 1) * (old.shape[1] / new.shape[1])
    return {first: adapted.to(new.dtype)}


def warn_on_normalization(model: nn.Module, data: DataBundle) -> None:
    """One line when ``model``'s starting weights were trained with another input
    normalisation than the one this run applies to ``data``."""
    record = loaded_weights(model)
    if record is None or record.normalization is None:
        return
    used = Normalization.of(data)
    if not record.normalization.matches(used):
        log.warning("weights from %s were trained on inputs with %s, but this run feeds them %s; "
                    "set the dataset's normalisation option to match, or expect them to transfer worse", record.source, record.normalization.describe(), used.describe())


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    if len(a) != len(b):  # a grey channel against RGB ones (adapted weights): their average, as a grey pixel is
        if 1 not in (len(a), len(b)):
            return False
        a, b = ([sum(a) / len(a)], b) if len(b) == 1 else (a, [sum(b) / len(b)])
    return all(math.isclose(x, y, rel_tol=1e-2, abs_tol=1e-3) for x, y in zip(a, b))


def _numbers(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
