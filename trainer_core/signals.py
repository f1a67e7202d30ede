"""SIGINT and SIGTERM end a run cleanly: finish the step, then stop."""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any, Callable

HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """While active, the first SIGINT or SIGTERM calls ``request_stop`` (the loop
    stops after the current step, runs the end-of-fit hooks and returns); a
    second SIGINT raises ``KeyboardInterrupt`` at once.

    Only the main thread can install handlers; elsewhere this does nothing.
    """

    def __init__(self, request_stop: Callable[[str], None]) -> None:
        self.request_stop = request_stop
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None and hasattr(signal, "SIGCHLD"):
            # Sent to the process group, the signal also ends DataLoader workers, and torch's
            # SIGCHLD handler would raise wherever the loop is (mid-step): the loop stops at
            # the step's end instead, and a loader that lost its workers ends its epoch early.
            self._previous.setdefault(signal.SIGCHLD, signal.signal(signal.SIGCHLD, signal.SIG_DFL))
        self.received = signum
        self.request_stop(f"received {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int | None:
        """The shell's convention for a run ended by a signal: 128 + its number."""
        return 128 + self.received if self.received is not None else None
