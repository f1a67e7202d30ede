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
def test_csv_logger_package(tmp_path: Path) -> None:
    env = install("trainer-csv-logger", tmp_path)
    # Its own tests list it with `trainer plugins` and run it with `trainer run` from the installed copy.
    tests = run(["-m", "pytest", "-q", "-p", "no:cacheprovider"], env, cwd=tmp_path / "trainer-csv-logger")
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout and "failed" not in tests.stdout


@pytest.mark.slow
def test_extra_data_package(tmp_path: Path) -> None:
    env = install("trainer-extra-data", tmp_path)
    # Its own tests list both with `trainer models` / `trainer datasets` and train on an npz file.
    tests = run(["-m", "pytest", "-q", "-p", "no:cacheprovider"], env, cwd=tmp_path / "trainer-extra-data")
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout and "failed" not in tests.stdout
