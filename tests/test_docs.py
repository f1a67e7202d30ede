"""The hook documentation is generated from the code: these fail when it drifts."""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_core import docgen, hookspecs
from trainer_core.pluginmanager import hook_names

ROOT = Path(__file__).resolve().parent.parent
REGENERATE = "run `python -m trainer_core.docgen` and commit the result"


def test_hook_reference_matches_the_specs() -> None:
    assert (ROOT / "docs" / "hooks.md").read_text(encoding="utf-8") == docgen.render_hooks(), REGENERATE


def test_hook_order_table_matches_a_real_run() -> None:
    guide = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    assert guide == docgen.replace_section(guide, docgen.render_order()), REGENERATE


@pytest.mark.parametrize("name", hook_names())
def test_every_hook_documents_each_argument_and_its_return(name: str) -> None:
    function = getattr(hookspecs, name)
    _, params, returns = docgen.split_fields(function.__doc__ or "")
    assert [p for p, _ in params] == list(inspect.signature(function).parameters)
    assert returns, f"{name} does not say what its return value means"


@pytest.mark.parametrize("name", hook_names())
def test_every_hook_has_a_section_with_its_signature(name: str) -> None:
    reference = docgen.render_hooks()
    assert f"\n## {name}\n\n```python\n{name}{inspect.signature(getattr(hookspecs, name))}".replace("'", "") in reference


def test_the_order_table_records_every_hook_but_on_exception() -> None:
    recorded = {name for _, name, *_ in docgen.record_runs()}
    assert recorded == set(hook_names()) - {"on_exception"}


@pytest.mark.slow
def test_check_fails_on_a_stale_reference_and_regenerating_fixes_it(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "plugins.md", tmp_path / "docs" / "plugins.md")
    stale = docgen.render_hooks().replace("Called once, after the model is built", "Called whenever")
    (tmp_path / "docs" / "hooks.md").write_text(stale, encoding="utf-8")
    command = [sys.executable, "-m", "trainer_core.docgen", "--root", str(tmp_path), "--check"]
    checked = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 1 and "hooks.md" in checked.stderr
    assert docgen.main(["--root", str(tmp_path)]) == 0
    assert (tmp_path / "docs" / "hooks.md").read_text(encoding="utf-8") == docgen.render_hooks()
    assert docgen.main(["--root", str(tmp_path), "--check"]) == 0
