import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

pytest_plugins = ["trainer_core.testing"]


@pytest.fixture(scope="session")
def baselines() -> ModuleType:
    """``benchmarks/baselines.py``: a script, not a package module, loaded by path."""
    spec = importlib.util.spec_from_file_location("baselines", Path(__file__).resolve().parents[1] / "benchmarks" / "baselines.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
