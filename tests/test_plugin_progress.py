"""progress: plain lines off a terminal, a throttled live bar on one, silence off the main process."""

from __future__ import annotations

import io
import re

import pytest

from trainer_core_plugins.progress import Progress
from trainer_core.distributed import is_rank_zero_only
from trainer_core.testing import run_tiny

CLEAR = "\r\x1b[2K"  # back to the line's start and erase it


def progress(bar: str = "auto", refresh_per_second: float = 10.0) -> Progress:
    plugin = Progress(bar=bar, refresh_per_second=refresh_per_second)  # type: ignore[arg-type]
    plugin.stream = io.StringIO()  # not a terminal: "auto" means no bar
    return plugin


def test_one_epoch_of_one_step_is_singular() -> None:
    plugin = progress()
    run_tiny({"progress": plugin}, epochs=1, batch_size=48)
    assert "48 train / 24 validation samples, 1 epoch of 1 step, batch 48," in plugin.stream.getvalue()


def test_plain_lines_off_a_terminal() -> None:
    plugin = progress()
    trainer = run_tiny({"progress": plugin}, epochs=3)
    output = plugin.stream.getvalue()
    assert "\r" not in output
    lines = output.splitlines()
    assert lines[0].startswith("training ") and "48 train / 24 validation samples, 3 epochs of 3 steps, batch 16" in lines[0]
    history = trainer.state.history
    assert len(lines) == 1 + len(history) + 1
    for line, metrics in zip(lines[1:], history):
        assert line.startswith(
            f"epoch {metrics['epoch']}/3  train loss {metrics['train/loss']:.4f}  val loss {metrics['val/loss']:.4f}  "
            f"val acc {100 * metrics['val/acc']:.2f}%"
        )
    best = max(history, key=lambda m: m["val/acc"])
    assert re.match(r"done in \d+:\d\d: final val acc ", lines[-1])
    assert lines[-1].endswith(f"best {100 * best['val/acc']:.2f}% at epoch {best['epoch']}")


@pytest.mark.parametrize(("refresh", "draws"), [(1e9, 6), (1e-9, 1)])
def test_live_bar_is_throttled(refresh: float, draws: int) -> None:
    # 1e9 redraws a second allows one every step; 1e-9 only the first (the next is due in 30 years).
    plugin = progress(bar="on", refresh_per_second=refresh)
    run_tiny({"progress": plugin}, epochs=2)
    output = plugin.stream.getvalue()
    bars = [part for part in output.split(CLEAR) if part.startswith("epoch ") and "samples/s" in part]
    assert len(bars) == draws
    assert bars[0].startswith("epoch 1/2 [######..............] 1/3  ")
    if draws == 6:
        assert bars[-1].startswith("epoch 2/2 [####################] 3/3  loss ")
    # Every printed line first erases the bar, so none is left half-overwritten.
    for line in ("epoch 1/2  train loss", "epoch 2/2  train loss", "done in "):
        assert CLEAR + line in output


def test_nothing_printed_off_the_main_process() -> None:
    assert is_rank_zero_only(Progress())  # a distributed run does not even register it on other ranks
    plugin = progress(bar="on")
    trainer = run_tiny({"progress": plugin}, epochs=1, fit=False)
    trainer.rank = 1
    trainer.fit()
    assert plugin.stream.getvalue() == ""


def test_bad_refresh_rate_is_refused() -> None:
    with pytest.raises(ValueError, match=r"progress.refresh_per_second must be > 0 \(got 0.0\)"):
        Progress(refresh_per_second=0.0)
