"""Per-class accuracy and a confusion matrix at each evaluation.

The matrix is accumulated on the training device, one scatter-add per
validation batch (no Python loop per sample, any batch size including a short
last batch), and read back once per evaluation.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any, Mapping, TextIO

from trainer_core import UsageError, atomic_write_bytes, check_saved_state, hookimpl, metric_keys

if TYPE_CHECKING:
    import torch

    from trainer_core import Trainer

class ClassAccuracy:
    """Per-class validation accuracy (``val/acc/<class>`` metrics), a confusion
    matrix (``confusion_matrix.json`` in the run folder) and a table at the end.

    In a distributed run every rank counts its shard and the matrices are
    summed; files and the table come from rank zero."""

    def __init__(self, prefix: str = "val/acc", table: bool = True, matrix_file: str = "confusion_matrix.json") -> None:
        """:param prefix: metric names are ``<prefix>/<class>``.
        :param table: print the per-class table when the run ends.
        :param matrix_file: file name in the run folder for the latest confusion
            matrix; empty for none."""
        if not prefix or prefix.startswith("/") or prefix.endswith("/"):
            raise ValueError(f"class-accuracy.prefix must be a name like 'val/acc' (got {prefix!r})")
        if matrix_file and (matrix_file in (".", "..") or "/" in matrix_file or "\\" in matrix_file):
            raise ValueError(f"class-accuracy.matrix_file must be a file name without folders (got {matrix_file!r})")
        self.prefix = prefix
        self.table = table
        self.matrix_file = matrix_file
        self.stream: TextIO = sys.stdout
        #: The latest evaluation's confusion matrix on the CPU (rows: true class,
        #: columns: predicted class), or ``None`` before the first evaluation.
        self.confusion: torch.Tensor | None = None
        #: ``epoch`` and ``step`` of the evaluation :attr:`confusion` comes from
    #: (and ``restored``: weights restored when training ended, e.g. the best).
        self.evaluated_at: dict[str, int] = {}
        self._counts: torch.Tensor | None = None
        self._classes: list[str] = []
        self._keys: list[str] = []

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.task.name != "classification":
            raise UsageError(f"class-accuracy is for the classification task, but this run's task is "
                             f"'{trainer.task.name}'; leave class-accuracy off (--plugins no:class-accuracy)")
        self._classes = [str(name) for name in trainer.data.classes]
        self._keys = metric_keys(self._classes)

    @hookimpl
    def on_eval_start(self, trainer: Trainer) -> None:
        import torch

        classes = len(self._classes)
        self._counts = torch.zeros(classes * classes, dtype=torch.int64, device=trainer.device)

    @hookimpl
    def on_eval_batch(self, targets: torch.Tensor, outputs: torch.Tensor) -> None:
        assert self._counts is not None, "on_eval_batch before on_eval_start"
        classes = len(self._classes)
        if outputs.shape[1] != classes:  # a shape, not a value: no sync; a wrong one would alias cells
            raise UsageError(
                f"class-accuracy: the model gives {outputs.shape[1]} scores per sample but the dataset "
                f"has {classes} classes; build the model for this dataset"
            )
        cells = targets.long() * classes + outputs.argmax(dim=1)
        # scatter_add_ rather than torch.bincount: on CUDA bincount reads the
        # maximum back to the host, a sync per batch.
        self._counts.scatter_add_(0, cells, cells.new_ones(cells.shape))

    @hookimpl
    def collect_eval_metrics(self, trainer: Trainer) -> Mapping[str, float] | None:
        if self._counts is None:
            return None
        classes = len(self._classes)
        # Each rank counted its shard; every rank gets here at once (a collective).
        self.confusion = trainer.all_reduce(self._counts).view(classes, classes).cpu()
        self._counts = None
        restored = trainer.state.restored  # the weights put back at the end (the best), not the last epoch's
        self.evaluated_at = ({"epoch": restored["epoch"], "step": restored["step"], "restored": True} if restored
                             else {"epoch": trainer.state.epoch, "step": trainer.state.step})
        if trainer.is_main and trainer.run_path is not None and self.matrix_file:
            self._save(trainer)
        correct, total = self.confusion.diagonal().tolist(), self.confusion.sum(dim=1).tolist()
        # A class without validation samples has no accuracy; it is left out rather than NaN.
        return {f"{self.prefix}/{key}": c / t for key, c, t in zip(self._keys, correct, total) if t}

    def _save(self, trainer: Trainer) -> None:
        assert self.confusion is not None and trainer.run_path is not None
        document = {
            **self.evaluated_at,
            "classes": self._classes,
            "rows": "true class",
            "columns": "predicted class",
            "matrix": self.confusion.tolist(),
        }
        # One line per matrix row, so the file reads as a table.
        head = "".join(f"  {json.dumps(key)}: {json.dumps(value)},\n" for key, value in document.items() if key != "matrix")
        rows = ",\n".join(f"    {json.dumps(row)}" for row in document["matrix"])
        atomic_write_bytes(trainer.run_path / self.matrix_file, f'{{\n{head}  "matrix": [\n{rows}\n  ]\n}}\n'.encode())

    def format_table(self) -> str:
        """The latest evaluation as an aligned table: class, correct, total, accuracy."""
        if self.confusion is None:
            return "per-class accuracy: no evaluation yet"
        correct, total = self.confusion.diagonal().tolist(), self.confusion.sum(dim=1).tolist()
        rows = [(name, c, t) for name, c, t in zip(self._classes, correct, total)]
        rows.append(("all", sum(correct), sum(total)))
        width = max(len("class"), *(len(name) for name, _, _ in rows))
        digits = max(len("correct"), len(str(sum(total))))
        which = ", the restored best weights" if self.evaluated_at.get("restored") else ""
        lines = [
            f"per-class accuracy (epoch {self.evaluated_at.get('epoch', '?')}{which}):",
            f"{'class':<{width}}  {'correct':>{digits}}  {'total':>{digits}}  accuracy",
        ]
        for index, (name, c, t) in enumerate(rows):
            if index == len(rows) - 1:
                lines.append("-" * (width + 2 * digits + 16))
            accuracy = f"{100 * c / t:7.2f} %" if t else "    n/a"
            lines.append(f"{name:<{width}}  {c:>{digits}}  {t:>{digits}}  {accuracy}")
        return "\n".join(lines)

    @hookimpl
    def on_fit_end(self, trainer: Trainer) -> None:
        if self.table and trainer.is_main and not trainer.quiet and self.confusion is not None:
            self.stream.write(self.format_table() + "\n")
            self.stream.flush()

    @hookimpl
    def plugin_state_dict(self) -> dict[str, Any] | None:
        if self.confusion is None:
            return None
        return {"confusion": self.confusion, "evaluated_at": dict(self.evaluated_at)}

    @hookimpl
    def load_plugin_state(self, state: dict[str, Any]) -> None:
        import torch

        check_saved_state(state, confusion=torch.Tensor, evaluated_at=dict)
        confusion = state["confusion"]
        if tuple(confusion.shape) != (len(self._classes), len(self._classes)):
            raise UsageError(
                f"class-accuracy: the checkpoint's confusion matrix is {tuple(confusion.shape)} "
                f"but the dataset has {len(self._classes)} classes; resume with the same dataset"
            )
        self.confusion = confusion
        self.evaluated_at = dict(state["evaluated_at"])

