"""The example packages under examples/ install with pip as separate distributions,
pass their own test suites, and show up in `trainer plugins` / `models` / `datasets`.

Each is installed into a temporary folder (``pip install --target``) that only
the subprocesses here see, so the test changes nothing in the environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def install(example: str, tmp_path: Path) -> dict[str, str]:
    """pip-install a copy of ``examples/<example>`` (the source tree stays clean) and
    return the environment that sees it."""
    source = shutil.copytree(EXAMPLES / example, tmp_path / example)
    target = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return {**os.environ, "PYTHONPATH": str(target)}


def run(args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, env=env, cwd=cwd)


@pytest.mark.slow
@pytest.mark.parametrize("package", ["trainer-csv-logger", "trainer-extra-data"])
def test_example_package_passes_its_own_tests(tmp_path: Path, package: str) -> None:
    env = install(package, tmp_path)
    # Its own tests list what it adds (`trainer plugins` / `models` / `datasets`) and train with it.
    tests = run(["-m", "pytest", "-q", "-p", "no:cacheprovider"], env, cwd=tmp_path / package)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout and "failed" not in tests.stdout
