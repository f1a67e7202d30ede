"""Regression: one or more float targets per sample."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal, Mapping

from trainer_core import Task, UsageError

if TYPE_CHECKING:
    import torch

    from trainer_core import DataBundle


class Regression(Task):
    """Predict one or more real values per sample.

    Targets are floats, ``N`` or ``N x K``; the model outputs ``K`` values.
    With ``standardize`` (the default) the model learns targets scaled to zero
    mean and unit variance on the training split, and its outputs are scaled
    back for metrics and predictions.  Metrics, in the targets' own units:
    ``val/mse``, ``val/mae`` and ``val/r2`` (the coefficient of determination,
    averaged over targets); ``val/loss`` is the training loss on the validation
    split (on standardised targets).
    """

    headline = "val/r2"
    modes = {"val/loss": "min", "val/mse": "min", "val/mae": "min", "val/r2": "max"}
    export_doc = "values N x targets, in the targets' own units (the training's target scaling is undone inside)"

    def __init__(self, loss: Literal["mse", "l1", "huber"] = "mse", huber_delta: float = 1.0,
                 standardize: bool = True) -> None:
        """:param loss: ``mse`` (squared error), ``l1`` (absolute error) or ``huber``.
        :param huber_delta: where huber turns from squared to absolute error.
        :param standardize: learn targets scaled by the training split's mean and
            standard deviation (undone in metrics and predictions)."""
        if not huber_delta > 0:
            raise ValueError(f"huber_delta must be > 0 (got {huber_delta})")
        self.loss_name = loss
        self.huber_delta = huber_delta
        self.standardize = standardize
        self.mean: torch.Tensor | None = None  # per target; None: no scaling
        self.std: torch.Tensor | None = None
        self._size = 0  # values per sample
        self._device: torch.device | None = None

    def output_size(self, data: DataBundle) -> int:
        from trainer_core import held_targets

        targets = held_targets(data.train)
        return targets[0].numel() if targets is not None and len(targets) else len(data.classes)

    def check(self, data: DataBundle) -> None:
        from trainer_core import held_targets

        for split in ("train", "val"):
            targets = held_targets(getattr(data, split))
            if targets is None:
                continue
            if not targets.is_floating_point():
                raise ValueError(f"its {split} targets are {str(targets.dtype).removeprefix('torch.')}, not floats")
            if targets.dim() > 2:
                raise ValueError(f"its {split} targets have shape {tuple(targets.shape[1:])} per sample; give N or N x K")
            if data.classes and targets[0].numel() != len(data.classes):
                raise ValueError(f"its {split} targets have {targets[0].numel()} values per sample "
                                 f"but it names {len(data.classes)} targets")

    def setup(self, data: DataBundle, device: torch.device) -> None:
        from trainer_core import held_targets

        super().setup(data, device)
        self._size, self._device = self.output_size(data), device
        if self.mean is None and self.standardize:
            targets = held_targets(data.train)
            if targets is None:
                raise UsageError("task.standardize needs the training targets in memory (a TensorSplit); "
                                 "set -o task.standardize=false")
            values = targets.double().reshape(len(targets), -1)
            std = values.std(0) if len(values) > 1 else values.new_ones(values.shape[1])
            self.mean, self.std = values.mean(0).float(), std.clamp(min=1e-12).float()
        if self.mean is not None and self.std is not None:  # computed here, or loaded from a checkpoint
            self.mean, self.std = self.mean.to(device), self.std.to(device)

    def _scaled(self, targets: torch.Tensor) -> torch.Tensor:
        return (targets - self.mean) / self.std if self.mean is not None else targets

    def _unscaled(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs * self.std + self.mean if self.mean is not None else outputs

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        outputs = outputs.reshape(outputs.shape[0], -1)
        if outputs.shape[1] * outputs.shape[0] != targets.numel():  # shapes only: no host sync
            raise UsageError(f"the model gives {outputs.shape[1]} values per sample but the targets have "
                             f"{targets.numel() // max(1, targets.shape[0])}; build the model for this dataset")
        wanted = self._scaled(targets.reshape(outputs.shape).to(outputs.dtype))
        if self.loss_name == "l1":
            return F.l1_loss(outputs, wanted)
        if self.loss_name == "huber":
            return F.huber_loss(outputs, wanted, delta=self.huber_delta)
        return F.mse_loss(outputs, wanted)

    def new_sums(self, device: torch.device) -> torch.Tensor:
        import torch

        # loss x samples, samples, then per target: squared and absolute errors, sum and sum of squares of targets.
        return torch.zeros(2 + 4 * self._size, dtype=torch.float64, device=device)

    def add_sums(self, sums: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        import torch

        size = targets.shape[0]
        sums[0] += self.loss(outputs, targets).double() * size
        sums[1] += size
        values = targets.reshape(size, -1).double()
        errors = self._unscaled(outputs.reshape(size, -1)).double() - values
        sums[2:].view(4, -1).add_(torch.stack((errors.square().sum(0), errors.abs().sum(0), values.sum(0),
                                              values.square().sum(0))))

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        loss, size = sums[:2].tolist()
        squared, absolute, total, total_sq = sums[2:].view(4, -1).tolist()
        k = len(squared)
        spread = [sq - t * t / size for t, sq in zip(total, total_sq)]
        r2 = [1 - e / s if s > 0 else math.nan for e, s in zip(squared, spread)]
        return {"val/loss": loss / size, "val/mse": sum(squared) / (size * k), "val/mae": sum(absolute) / (size * k),
                "val/r2": sum(r2) / k}

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        return self._unscaled(outputs.reshape(outputs.shape[0], -1).float())

    def exported(self, outputs: torch.Tensor) -> torch.Tensor:
        return self.predict(outputs)

    def describe(self, prediction: torch.Tensor, names: list[str], top_k: int) -> dict[str, Any]:
        values = prediction.tolist()
        names = names if len(names) == len(values) else [f"target{i}" for i in range(len(values))]
        return {"predictions": [{"target": n, "value": v} for n, v in zip(names, values)]}

    def format(self, described: Mapping[str, Any]) -> list[str]:
        rows = described["predictions"]
        width = max(len(row["target"]) for row in rows)
        return [f"{row['target']:<{width}}  {row['value']:.6g}" for row in rows]

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).tolist() if getattr(self, name) is not None else None for name in ("mean", "std")}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        import torch

        if state.get("mean") is None or state.get("std") is None:
            self.mean = self.std = None
            return
        self.mean, self.std = (torch.tensor(state[k], dtype=torch.float32, device=self._device) for k in ("mean", "std"))
