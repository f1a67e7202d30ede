"""Multi-label classification: any number of the dataset's labels per sample."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from trainer_core import Task

if TYPE_CHECKING:
    import torch

    from trainer_core import DataBundle


class MultiLabel(Task):
    """Each sample carries any subset of the dataset's labels.

    Targets are multi-hot rows (``N x L`` of 0 and 1); the model outputs one
    logit per label, trained with binary cross-entropy.  A label is predicted
    when its probability reaches ``threshold``.  Metrics: ``val/loss``,
    ``val/f1_micro`` (over every label decision), ``val/f1_macro`` (the mean of
    the labels' F1; a label never present nor predicted counts 0, as
    scikit-learn's ``zero_division=0``) and ``val/exact_match`` (samples whose
    every label is right).
    """

    headline = "val/f1_micro"
    modes = {"val/loss": "min", "val/f1_micro": "max", "val/f1_macro": "max", "val/exact_match": "max"}
    export_doc = "logits N x labels (a sigmoid gives each label's probability)"

    def __init__(self, threshold: float = 0.5, pos_weight: float = 1.0) -> None:
        """:param threshold: probability from which a label counts as predicted.
        :param pos_weight: weight of the positive examples in the loss (above 1
            for rare labels)."""
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1) (got {threshold})")
        if not pos_weight > 0:
            raise ValueError(f"pos_weight must be > 0 (got {pos_weight})")
        self.threshold = threshold
        self.pos_weight = pos_weight
        self._labels = 0
        self._pos_weight: torch.Tensor | None = None

    def check(self, data: DataBundle) -> None:
        from trainer_core import held_targets

        labels = len(data.classes)
        if labels < 1:
            raise ValueError("the dataset names no labels")
        for split in ("train", "val"):
            targets = held_targets(getattr(data, split))
            if targets is None:
                continue
            if targets.dim() != 2 or targets.shape[1] != labels:
                raise ValueError(f"its {split} targets have shape {tuple(targets.shape[1:])} per sample, "
                                 f"not one 0/1 entry per label ({labels})")
            if not ((targets == 0) | (targets == 1)).all():
                raise ValueError(f"its {split} targets hold values other than 0 and 1")

    def setup(self, data: DataBundle, device: torch.device) -> None:
        import torch

        super().setup(data, device)
        self._labels = len(data.classes)
        self._pos_weight = torch.tensor(self.pos_weight, device=device) if self.pos_weight != 1.0 else None

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        return F.binary_cross_entropy_with_logits(outputs, targets.to(outputs.dtype), pos_weight=self._pos_weight)

    def new_sums(self, device: torch.device) -> torch.Tensor:
        import torch

        # loss x samples, samples, exact matches, then per label: true positives, false positives, false negatives.
        return torch.zeros(3 + 3 * self._labels, dtype=torch.float64, device=device)

    def add_sums(self, sums: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        import torch

        size = targets.shape[0]
        sums[0] += self.loss(outputs, targets).double() * size
        sums[1] += size
        predicted = self.predict(outputs) >= self.threshold
        actual = targets.bool()
        sums[2] += (predicted == actual).all(dim=1).sum()
        counts = torch.stack([(predicted & actual).sum(0), (predicted & ~actual).sum(0), (~predicted & actual).sum(0)])
        sums[3:].view(3, -1).add_(counts)

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        loss, size, exact = sums[:3].tolist()
        tp, fp, fn = sums[3:].view(3, -1).tolist()
        f1 = [2 * t / (2 * t + p + n) if t + p + n else 0.0 for t, p, n in zip(tp, fp, fn)]
        all_tp, errors = sum(tp), sum(fp) + sum(fn)
        return {"val/loss": loss / size, "val/f1_micro": 2 * all_tp / (2 * all_tp + errors) if all_tp + errors else 0.0,
                "val/f1_macro": sum(f1) / len(f1), "val/exact_match": exact / size}

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.float().sigmoid()

    def describe(self, prediction: torch.Tensor, names: list[str], top_k: int) -> dict[str, Any]:
        probabilities = prediction.tolist()
        return {"labels": [n for n, p in zip(names, probabilities) if p >= self.threshold],
                "probabilities": dict(zip(names, probabilities))}

    def format(self, described: Mapping[str, Any]) -> list[str]:
        width = max(len(name) for name in described["probabilities"])
        return [f"labels: {', '.join(described['labels']) or '(none)'}"] + [
            f"{name:<{width}}  {100 * p:6.2f} %{'  *' if name in described['labels'] else ''}"
            for name, p in described["probabilities"].items()]
