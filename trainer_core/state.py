"""The one object plugins read to know where training is."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    """Progress of a run.  The core updates it; plugins read it and stop the
    run with :meth:`Trainer.request_stop`, never by editing it.

    :ivar epoch: the current epoch, counted from 1 (0 before training).
    :ivar step: training batches done since the run began (an optimizer step
        follows every batch, or every ``accumulate_grad_batches`` batches).
    :ivar batch_idx: batches finished in the current epoch.
    :ivar metrics: the latest evaluation's merged metrics.
    :ivar history: every evaluation's metrics, oldest first.
    :ivar should_stop: set when someone asked the run to stop.
    :ivar stop_reason: why, in words, or ``None``.
    :ivar train_samples: training samples seen since the run began.
    :ivar train_seconds: wall time spent in training phases (without compilation).
    :ivar compile_seconds: wall time of the first step of a compiled model.
    :ivar duration_seconds: wall time of the run's sessions (``trainer run`` and each
        ``--resume``) before the current one, up to the checkpoint it continues from;
        :meth:`run_seconds` adds the current session's.
    :ivar started_at: when the run first started (seconds since the epoch; a
        resumed run keeps its first start).
    :ivar restored: when training ended and a plugin put other weights back (the
        checkpoint plugin's best), which: ``epoch``, ``step`` and ``source``; their
        evaluation is then :attr:`metrics` (see :meth:`Trainer.evaluate_restored`).
    :ivar last_epoch_metrics: the last epoch's evaluation, kept when :attr:`metrics` became the restored weights'.
    """

    epoch: int = 0
    step: int = 0
    batch_idx: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    should_stop: bool = False
    stop_reason: str | None = None
    train_samples: int = 0
    train_seconds: float = 0.0
    compile_seconds: float = 0.0
    duration_seconds: float = 0.0
    session_started: float | None = field(default=None, repr=False)  # (perf_counter; not saved)
    started_at: float = 0.0
    restored: dict[str, Any] | None = None
    last_epoch_metrics: dict[str, float] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "batch_idx": self.batch_idx,
            "metrics": dict(self.metrics),
            "history": [dict(m) for m in self.history],
            "train_samples": self.train_samples,
            "train_seconds": self.train_seconds,
            "compile_seconds": self.compile_seconds,
            "duration_seconds": self.run_seconds(),  # a resume from this state continues from here
            "started_at": self.started_at,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def start_session(self) -> None:
        """The current session (one ``fit``) starts now."""
        self.session_started = time.perf_counter()

    def session_seconds(self) -> float:
        """Wall time of the current session so far (0 outside ``fit``)."""
        return time.perf_counter() - self.session_started if self.session_started is not None else 0.0

    def run_seconds(self) -> float:
        """Wall time of the whole run so far: the earlier sessions' and the current one's."""
        return self.duration_seconds + self.session_seconds()

    def end_session(self) -> float:
        """The current session ends: its time (returned) joins :attr:`duration_seconds`."""
        session = self.session_seconds()  # (one clock read: the session's and the run's time agree)
        self.duration_seconds, self.session_started = self.duration_seconds + session, None
        return session
