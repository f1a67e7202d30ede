"""Fuzzing the files a run reads back (issue 14): ``metrics.jsonl``, ``summary.json``,
``config.toml`` and the checkpoint's payload, each with parts removed, of the wrong type
or out of range.  ``trainer runs``, ``trainer run --resume`` and ``trainer eval
--checkpoint`` either work or fail with one ``error:`` line (exit 2), never a traceback
or a bare ``TypeError``, and a command that fails leaves every file of the run folder
byte for byte as it was.  The plugins' saved states are damaged too, inside."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from functools import reduce
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_run_ownership import cli, snapshot
from trainer_core import load_checkpoint
from trainer_core.checkpointing import save_checkpoint
from trainer_core.config import tomllib

# Per file; each example runs the three commands in this process (about a second).  FUZZ_EXAMPLES=200 searches longer.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 8))

# Values of every kind a file may hold instead of the right one (TOML has no null).
TOML_VALUES = st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.sampled_from([-1, 0, 2**31, 2**62]),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.lists(st.integers(), max_size=3),
                        st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
JSON_VALUES = st.one_of(st.none(), TOML_VALUES, st.integers(-(2**80), 2**80))
PAYLOAD_VALUES = st.one_of(JSON_VALUES, st.builds(torch.zeros, st.integers(0, 3)), st.just(torch.tensor([math.nan])),
                           st.just(torch.zeros(2, 2, dtype=torch.int64)))


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch run with checkpoints and every built-in plugin's saved state: the folder every example damages."""
    run = tmp_path_factory.mktemp("finished") / "run"
    code, output = cli("run", "--dataset", "fake", "--device", "cpu", "-q", "--model", "mlp", "-o", "model.hidden=8",
                       "--epochs", "1", "--plugins", "checkpoint,steplr,early-stopping,class-accuracy,freeze,tensorboard",
                       "-o", "steplr.step_size=1", "-o", "early-stopping.restore_best_weights=true",
                       "-o", "checkpoint.restore_best=false", "-o", "freeze.unfreeze_at_epoch=2", "--run-dir", run)
    assert code == 0, output
    return run


def paths(value: Any, prefix: tuple[Any, ...] = (), depth: int = 4) -> list[tuple[Any, ...]]:
    """Every key path into ``value``'s tables and lists, ``depth`` levels deep."""
    if depth == 0:
        return []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    found = []
    for key, child in items:
        found.append((*prefix, key))
        found.extend(paths(child, (*prefix, key), depth - 1))
    return found


def damaged(value: Any, draw: Callable[..., Any], values: st.SearchStrategy[Any]) -> Any:
    """``value`` with one part (drawn) removed or replaced by a value drawn from ``values``."""
    where = paths(value)
    if not where:
        return draw(values)
    path = draw(st.sampled_from(where))
    changed = copy.deepcopy(value)
    parent = reduce(lambda v, k: v[k], path[:-1], changed)
    if draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(values)
    return changed


def assert_works_or_one_clean_error(args: list[str | Path], run: Path, before: dict[str, bytes], what: str) -> None:
    code, output = cli(*args)
    assert "Traceback" not in output, (what, output)
    if code == 0:
        return
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    others = [line for line in output.splitlines() if not line.startswith(("error: ", "warning: "))]
    assert len(errors) == 1 and not others and output.endswith("\n"), (what, output)
    assert code == 2, (what, code, output)  # bad input
    assert snapshot(run) == before, (what, "a failed command changed the run folder")


def check_commands(finished: Path, damage: Callable[[Path], str]) -> None:
    """Damage a copy of the finished run, then run the three commands on it."""
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "runs"
        run = Path(shutil.copytree(finished, root / "run"))
        what = damage(run)
        before = snapshot(run)
        assert_works_or_one_clean_error(["runs", root], run, before, what)
        assert snapshot(run) == before, (what, "trainer runs changed the run folder")
        assert_works_or_one_clean_error(["eval", "--checkpoint", run / "checkpoints" / "last.pt"], run, before, what)
        assert snapshot(run) == before, (what, "trainer eval changed the run folder")
        assert_works_or_one_clean_error(["run", "--resume", run, "--epochs", "2", "-q"], run, before, what)


# The same examples on every run of the suite (a failure reproduces); FUZZ_EXAMPLES draws more of them.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.data())
def test_a_damaged_metrics_file(finished: Path, data: st.DataObject) -> None:
    records = [json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines()]
    lines = []
    for kind in data.draw(st.lists(st.sampled_from(["record", "json", "bytes"]), min_size=1, max_size=3)):
        if kind == "bytes":
            lines.append(data.draw(st.binary(max_size=12)))
        else:
            value = damaged(records[0], data.draw, JSON_VALUES) if kind == "record" else data.draw(JSON_VALUES)
            lines.append(json.dumps(value).encode())
    text = b"\n".join(lines) + data.draw(st.sampled_from([b"\n", b""]))

    def damage(run: Path) -> str:
        (run / "metrics.jsonl").write_bytes(text)
        return f"metrics.jsonl = {text!r}"

    check_commands(finished, damage)


@FUZZ
@given(st.data())
def test_a_damaged_summary(finished: Path, data: st.DataObject) -> None:
    summary = json.loads((finished / "summary.json").read_text())
    text = json.dumps(damaged(summary, data.draw, JSON_VALUES) if data.draw(st.booleans()) else data.draw(JSON_VALUES))

    def damage(run: Path) -> str:
        (run / "summary.json").write_text(text)
        return f"summary.json = {text}"

    check_commands(finished, damage)


@FUZZ
@given(st.data())
def test_a_damaged_config(finished: Path, data: st.DataObject) -> None:
    import tomli_w

    config = tomllib.loads((finished / "config.toml").read_text())
    text = tomli_w.dumps(damaged(config, data.draw, TOML_VALUES))

    def damage(run: Path) -> str:
        (run / "config.toml").write_text(text)
        return f"config.toml = {text!r}"

    check_commands(finished, damage)


@FUZZ
@given(st.data())
def test_a_damaged_checkpoint_payload(finished: Path, data: st.DataObject) -> None:
    """A checkpoint written as a run writes it (its checksums are right), holding the wrong things."""
    payload = damaged(load_checkpoint(finished / "checkpoints" / "last.pt"), data.draw, PAYLOAD_VALUES)

    def damage(run: Path) -> str:
        for checkpoint in (run / "checkpoints").glob("*.pt"):
            save_checkpoint(checkpoint, payload)
        return f"checkpoint payload = {describe(payload)}"

    check_commands(finished, damage)


@FUZZ
@given(st.data())
def test_a_damaged_plugin_state(finished: Path, data: st.DataObject) -> None:
    """The inside of the plugins' saved states (steplr's ``last_epoch``, early-stopping's best weights...),
    which torch or the plugin would take in and trip over later, mid-run."""
    payload = load_checkpoint(finished / "checkpoints" / "last.pt")
    payload["plugins"] = damaged(payload["plugins"], data.draw, PAYLOAD_VALUES)

    def damage(run: Path) -> str:
        for checkpoint in (run / "checkpoints").glob("*.pt"):
            save_checkpoint(checkpoint, payload)
        return f"plugin states = {describe(payload['plugins'])}"

    check_commands(finished, damage)


def describe(value: Any) -> str:
    """The payload, short: tensors by shape."""
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(describe(v) for v in value) + "]"
    return repr(value)


def test_an_optimizer_state_entry_that_is_no_table_is_refused_before_anything_changes(finished: Path, tmp_path: Path) -> None:
    """Found by the fuzz test: a ``None`` in the optimizer's state was a bare TypeError (exit 1)."""
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    payload = load_checkpoint(run / "checkpoints" / "last.pt")
    payload["optimizer"]["state"][0] = None
    save_checkpoint(run / "checkpoints" / "last.pt", payload)
    before = snapshot(run)
    code, output = cli("run", "--resume", run / "checkpoints" / "last.pt", "--epochs", "2", "-q")
    assert (code, output) == (2, f"error: checkpoint {run / 'checkpoints' / 'last.pt'} cannot be resumed: its 'optimizer' is "
                                 "not an optimizer's state (state and param_groups)\n")
    assert snapshot(run) == before


def test_a_schedulers_position_as_text_is_refused_before_anything_changes(finished: Path, tmp_path: Path) -> None:
    """Left by issue 14: torch's StepLR took ``last_epoch = "x"`` in and the run failed at its first epoch's end (exit 1)."""
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    payload = load_checkpoint(run / "checkpoints" / "last.pt")
    payload["plugins"]["steplr"]["scheduler"]["last_epoch"] = "x"
    save_checkpoint(run / "checkpoints" / "last.pt", payload)
    before = snapshot(run)
    code, output = cli("run", "--resume", run / "checkpoints" / "last.pt", "--epochs", "2", "-q")
    assert (code, output) == (2, "error: the checkpoint's state of plugin 'steplr' cannot be taken back (its 'last_epoch' is "
                                 "str, not a whole number); resume from another checkpoint, or start a new run from its "
                                 "weights with -o model.weights=CHECKPOINT\n")
    assert snapshot(run) == before


def test_a_checkpoint_marked_capturable_resumes_on_the_cpu(finished: Path, tmp_path: Path) -> None:
    """``capturable`` (a CUDA graph's optimizer) says where the state lives: the resuming run decides it.
    Taken from the file, Adam's first step on the CPU failed (exit 1); checkpoints are saved uncapturable."""
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    payload = load_checkpoint(run / "checkpoints" / "last.pt")
    assert payload["optimizer"]["param_groups"][0]["capturable"] is False
    payload["optimizer"]["param_groups"][0]["capturable"] = True
    save_checkpoint(run / "checkpoints" / "last.pt", payload)
    code, output = cli("run", "--resume", run / "checkpoints" / "last.pt", "--epochs", "2", "-q")
    assert code == 0, output
