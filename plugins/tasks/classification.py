"""Single-label classification: one class index per sample, cross-entropy, accuracy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from trainer_core import Task

if TYPE_CHECKING:
    import torch

    from trainer_core import DataBundle


class Classification(Task):
    """Each sample belongs to one of the dataset's classes.

    Targets are class indices (``int64``); the model outputs one logit per
    class.  Metrics: ``val/loss`` (cross-entropy) and ``val/acc``; a
    prediction is the classes' probabilities (softmax).
    """

    headline = "val/acc"
    modes = {"val/loss": "min", "val/acc": "max"}
    export_doc = "logits N x classes (softmax gives probabilities)"

    def __init__(self, label_smoothing: float = 0.0, class_weights: list[float] | None = None) -> None:
        """:param label_smoothing: share of each target's probability spread over
            the other classes (0: plain cross-entropy).
        :param class_weights: a weight per class in the loss, e.g. ``1,4`` to
            count the rarer second class four times (default: all equal)."""
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1) (got {label_smoothing})")
        if class_weights is not None and not all(w >= 0 for w in class_weights):
            raise ValueError(f"class_weights must be >= 0 (got {class_weights})")
        self.label_smoothing = label_smoothing
        self.class_weights = class_weights
        self._weight: torch.Tensor | None = None

    def check(self, data: DataBundle) -> None:
        from trainer_core import held_targets

        classes = len(data.classes)
        if classes < 1:
            raise ValueError("the dataset names no classes")
        if self.class_weights is not None and len(self.class_weights) != classes:
            raise ValueError(f"task.class_weights has {len(self.class_weights)} weights for {classes} classes")
        for split in ("train", "val"):
            targets = held_targets(getattr(data, split))
            if targets is None:
                continue
            if targets.is_floating_point() or targets.dim() != 1:
                raise ValueError(f"its {split} targets are {_kind(targets)}, not one class index per sample")
            if len(targets) and not 0 <= int(targets.min()) <= int(targets.max()) < classes:
                raise ValueError(f"its {split} targets hold class indices outside 0..{classes - 1}")

    def setup(self, data: DataBundle, device: torch.device) -> None:
        import torch

        super().setup(data, device)
        self._weight = torch.tensor(self.class_weights, device=device) if self.class_weights is not None else None

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        return F.cross_entropy(outputs, targets, weight=self._weight, label_smoothing=self.label_smoothing)

    def new_sums(self, device: torch.device) -> torch.Tensor:
        import torch

        return torch.zeros(3, dtype=torch.float64, device=device)  # loss x samples, right, samples

    def add_sums(self, sums: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        size = targets.shape[0]
        sums[0] += self.loss(outputs, targets).double() * size
        sums[1] += (outputs.argmax(dim=1) == targets).sum()
        sums[2] += size

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        loss, right, size = sums.tolist()
        return {"val/loss": loss / size, "val/acc": right / size}

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.float().softmax(dim=1)

    def describe(self, prediction: torch.Tensor, names: list[str], top_k: int) -> dict[str, Any]:
        values, indices = prediction.topk(min(top_k, prediction.shape[0]))
        return {"predictions": [{"class": names[i], "index": i, "probability": p}
                                for p, i in zip(values.tolist(), indices.tolist())]}

    def format(self, described: Mapping[str, Any]) -> list[str]:
        rows = described["predictions"]
        width = max(len(row["class"]) for row in rows)
        return [f"{rank}. {row['class']:<{width}}  {100 * row['probability']:6.2f} %" for rank, row in enumerate(rows, 1)]


def _kind(targets: torch.Tensor) -> str:
    dtype = str(targets.dtype).removeprefix("torch.")
    return f"{dtype} rows of shape {tuple(targets.shape[1:])}" if targets.dim() > 1 else f"{dtype} values"
