"""The hook documentation is generated from the code: these fail when it drifts."""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_core import docgen, hookspecs
from trainer_core.config import tomllib
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


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


@pytest.mark.slow
def test_the_guides_plugin_package_installs_lists_and_passes_its_tests(tmp_path: Path) -> None:
    """Follow docs/plugins.md literally: its files, pip install, `trainer plugins`, its tests."""
    guide = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    python = code_blocks(guide, "python")
    package = tmp_path / "trainer-loss-alarm"
    module = package / "src" / "trainer_loss_alarm" / "__init__.py"
    module.parent.mkdir(parents=True)
    module.write_text(next(b for b in python if b.startswith("# src/trainer_loss_alarm/__init__.py")))
    (package / "pyproject.toml").write_text(next(b for b in code_blocks(guide, "toml") if b.startswith("# pyproject.toml")))
    (package / "tests").mkdir()
    (package / "tests" / "conftest.py").write_text(next(b for b in python if b.startswith("pytest_plugins")))
    (package / "tests" / "test_loss_alarm.py").write_text(next(b for b in python if "def test_hook_in_isolation" in b))

    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site), str(package)]
    installed = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    env = {**os.environ, "PYTHONPATH": str(site)}

    console = next(b for b in code_blocks(guide, "console") if "$ trainer plugins" in b)
    expected = console.split("$ trainer plugins\n")[1].split("$ ")[0]
    listed = subprocess.run([sys.executable, "-m", "trainer_core", "plugins"], capture_output=True, text=True, env=env, timeout=120)
    assert listed.returncode == 0 and expected in listed.stdout, listed.stdout

    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=package,
                           capture_output=True, text=True, env=env, timeout=300)
    assert tests.returncode == 0 and "3 passed" in tests.stdout, tests.stdout[-3000:]


def test_the_readme_says_how_to_get_pytorchs_cpu_build_first() -> None:
    """Issue 15, item 9: a machine without a GPU need not download CUDA wheels."""
    first_screen = (ROOT / "README.md").read_text(encoding="utf-8").split("\n---\n")[0]
    command = next(line.split() for line in first_screen.splitlines() if "download.pytorch.org/whl/cpu" in line)
    assert command[command.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    torch_family = {re.match(r"[\w-]+", d).group() for d in project["dependencies"] if d.startswith("torch")}
    assert torch_family and torch_family <= set(command), f"the CPU install must name every torch package we need: {torch_family}"
    venv = [line for line in first_screen.splitlines() if line.startswith("    python3 -m venv")]
    assert "--index-url" not in venv[0] + venv[1]  # the two first-screen commands stay as they were
