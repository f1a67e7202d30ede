"""Guard tests for the contract: every hook documented, every hook tested."""

import inspect
import re
from pathlib import Path

import pytest

from trainer_core import hookspecs
from trainer_core.pluginmanager import hook_names, make_plugin_manager

HOOKS = hook_names()


def test_the_contract_has_the_hooks_the_loop_needs():
    for name in ["on_fit_start", "on_fit_end", "on_epoch_start", "on_epoch_end", "on_batch_start", "on_batch_end",
                 "on_before_backward", "on_before_optimizer_step", "on_eval_batch", "on_eval", "on_exception",
                 "plugin_state_dict", "load_plugin_state", "collect_eval_metrics"]:
        assert name in HOOKS


def test_manager_knows_exactly_the_declared_hooks():
    pm = make_plugin_manager()
    assert sorted(h for h in vars(pm.hook) if not h.startswith("_")) == sorted(HOOKS)


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_is_documented(name):
    spec = getattr(hookspecs, name)
    doc = inspect.getdoc(spec) or ""
    assert len(doc.splitlines()[0]) > 20, f"{name} needs a summary line"
    for arg in inspect.signature(spec).parameters:
        assert f":param {arg}:" in doc, f"{name} does not document its argument '{arg}'"
    assert ":return:" in doc, f"{name} does not say what its return value means"


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_has_a_test(name):
    sources = "\n".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    assert re.search(rf"def test_hook_{name}\(", sources), f"no test_hook_{name} in tests/"
