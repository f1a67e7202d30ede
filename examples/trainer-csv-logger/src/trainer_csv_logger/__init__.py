"""A trainer-core plugin: every evaluation's metrics as one row of a CSV file.

Spreadsheets, pandas (``pd.read_csv``) and plotting tools read it directly.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from trainer_core import UsageError, atomic_write_bytes, hookimpl

if TYPE_CHECKING:
    from trainer_core import Trainer

__version__ = "0.1.0"

FIRST = ("epoch", "step")  # always the first columns when present


class CsvLogger:
    """Writes each evaluation's metrics as a row of a CSV file (``metrics.csv`` in the run folder).

    A metric that first appears in a later evaluation adds a column (earlier
    rows get an empty cell).  On resume, rows written after the checkpoint are
    dropped and written again by the resumed run.
    """

    def __init__(self, filename: str = "metrics.csv", columns: list[str] | None = None, delimiter: str = ",") -> None:
        """:param filename: the CSV file, relative to the run folder (or absolute).
        :param columns: metrics to write (default: every metric); ``epoch`` and ``step`` are always written.
        :param delimiter: one character between cells, e.g. ``;`` for spreadsheets in some locales."""
        if not filename:
            raise ValueError("csv-logger.filename must not be empty")
        if len(delimiter) != 1:
            raise ValueError(f"csv-logger.delimiter must be one character (got {delimiter!r})")
        self.filename = filename
        self.columns = list(columns) if columns else None
        self.delimiter = delimiter
        self.path: Path | None = None
        self.fields: list[str] = []
        self.rows: list[dict[str, str]] = []  # what the file holds, to widen it when a metric appears
        self._resumed = False

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        path = Path(self.filename)
        if not path.is_absolute():
            if trainer.run_path is None:
                raise UsageError("csv-logger: this run writes no run folder; give an absolute -o csv-logger.filename=PATH")
            path = trainer.run_path / path
        self.path = path

    @hookimpl
    def load_plugin_state(self, state: dict[str, Any]) -> None:
        # Keep the rows up to the checkpoint; the resumed run writes the rest again.
        self.fields, self.rows = list(state["fields"]), [dict(row) for row in state["rows"]]
        self._resumed = True

    @hookimpl
    def on_eval(self, trainer: Trainer, metrics: Mapping[str, float]) -> None:
        if not trainer.is_main:
            return  # one file per run, written by the main process only
        if trainer.state.restored is not None:
            return  # the kept best weights evaluated again after training: not an epoch's row
        wanted = self.columns or [k for k in metrics if k not in FIRST]
        missing = [name for name in wanted if name not in metrics]
        if missing:
            available = ", ".join(k for k in metrics if k not in FIRST)
            raise UsageError(f"csv-logger.columns: no metric {', '.join(missing)} in this run; available: {available}")
        row = {name: _cell(metrics[name]) for name in [*(k for k in FIRST if k in metrics), *wanted]}
        new = [name for name in row if name not in self.fields]
        self.fields += new
        self.rows.append(row)
        if new or self._resumed:
            self._rewrite()  # new columns, a new file, or the first write after a resume
            self._resumed = False
        else:
            self._append(row)

    @hookimpl
    def plugin_state_dict(self) -> dict[str, Any]:
        return {"fields": list(self.fields), "rows": [dict(row) for row in self.rows]}

    def _writer(self, handle: io.TextIOBase) -> csv.DictWriter:
        return csv.DictWriter(handle, fieldnames=self.fields, delimiter=self.delimiter, restval="", lineterminator="\n")

    def _rewrite(self) -> None:
        """Write the whole file atomically (the core's temporary file, fsync and
        rename), so a crash never leaves half of it."""
        assert self.path is not None, "on_eval before on_fit_start"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = io.StringIO()
        writer = self._writer(text)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_bytes(self.path, text.getvalue().encode("utf-8"))

    def _append(self, row: Mapping[str, str]) -> None:
        assert self.path is not None
        with open(self.path, "a", encoding="utf-8", newline="") as handle:
            self._writer(handle).writerow(row)


def _cell(value: Any) -> str:
    """Floats at full precision (``repr``: ``nan`` and ``inf`` as words), the rest as text."""
    return repr(value) if isinstance(value, float) else str(value)
