"""Loading plugins from entry points, and every way a plugin can be wrong."""

import re
from pathlib import Path

import pytest

from click.testing import CliRunner

from trainer_core import PluginError, UsageError, hookimpl, make_plugin_manager
from trainer_core.cli import make_cli
from trainer_core.config import resolve_config, tomllib
from trainer_core.entrypoints import PLUGINS, Registry
from trainer_core.pluginmanager import check_plugin, implemented_hooks, register
from trainer_core.runner import load_plugins

GOOD = """
    from trainer_core import hookimpl

    class Good:
        '''A plugin with options.'''

        def __init__(self, limit: float = 1.0, name: str = "x", every: int = 1) -> None:
            if limit <= 0:
                raise ValueError(f"good.limit must be > 0 (got {limit})")
            self.limit, self.name, self.every = limit, name, every

        @hookimpl
        def on_eval(self, metrics):
            pass
"""


def test_a_fresh_manager_holds_no_plugins():
    first, second = make_plugin_manager(), make_plugin_manager()
    register(first, "x", object())
    assert second.get_plugins() == set()


def test_plugins_load_by_name_with_coerced_options(fake_entry_points):
    fake_entry_points("good-dist", {PLUGINS: {"good": "good_plugin:Good"}}, modules={"good_plugin": GOOD})
    pm = make_plugin_manager()
    load_plugins(pm, {"good": {"limit": "2.5", "every": "3"}})
    plugin = pm.get_plugin("good")
    assert (plugin.limit, plugin.name, plugin.every) == (2.5, "x", 3)
    assert implemented_hooks(pm, plugin) == ["on_eval"]


def test_unknown_plugin_suggests_and_lists_installed(fake_entry_points):
    fake_entry_points("good-dist", {PLUGINS: {"good": "good_plugin:Good"}}, modules={"good_plugin": GOOD})
    with pytest.raises(UsageError) as info:
        load_plugins(make_plugin_manager(), {"goood": {}})
    message = str(info.value)
    assert "unknown plugin 'goood' (did you mean 'good'?)" in message
    assert "installed plugins:" in message and "progress" in message and "\n" not in message


def test_unknown_option_lists_accepted_ones(fake_entry_points):
    fake_entry_points("good-dist", {PLUGINS: {"good": "good_plugin:Good"}}, modules={"good_plugin": GOOD})
    with pytest.raises(UsageError, match=r"unknown option 'good.limt' \(did you mean 'limit'\?\); good accepts: "
                                         r"limit: float = 1.0, name: str = 'x', every: int = 1"):
        load_plugins(make_plugin_manager(), {"good": {"limt": "2"}})


def test_ill_typed_option_names_the_type(fake_entry_points):
    fake_entry_points("good-dist", {PLUGINS: {"good": "good_plugin:Good"}}, modules={"good_plugin": GOOD})
    with pytest.raises(UsageError, match=r"option good.every='often' is not a valid int"):
        load_plugins(make_plugin_manager(), {"good": {"every": "often"}})


def test_a_plugins_own_validation_is_a_usage_error(fake_entry_points):
    fake_entry_points("good-dist", {PLUGINS: {"good": "good_plugin:Good"}}, modules={"good_plugin": GOOD})
    with pytest.raises(UsageError, match=r"^good: good.limit must be > 0 \(got -1.0\)$"):
        load_plugins(make_plugin_manager(), {"good": {"limit": "-1"}})


def test_a_plugin_that_fails_to_import_names_entry_point_and_distribution(fake_entry_points):
    fake_entry_points("broken-dist", {PLUGINS: {"broken": "broken_plugin:Broken"}},
                      modules={"broken_plugin": "import not_a_module_anywhere\n"})
    with pytest.raises(PluginError) as info:
        load_plugins(make_plugin_manager(), {"broken": {}})
    message = str(info.value)
    assert "plugin 'broken' failed to import" in message
    assert "'broken = broken_plugin:Broken' of distribution 'broken-dist'" in message
    assert "No module named 'not_a_module_anywhere'" in message


def test_the_same_name_from_two_distributions_names_both(fake_entry_points):
    fake_entry_points("first-dist", {PLUGINS: {"twin": "good_plugin:Good"}}, modules={"good_plugin": GOOD})
    fake_entry_points("second-dist", {PLUGINS: {"twin": "other_plugin:Good"}}, modules={"other_plugin": GOOD})
    with pytest.raises(UsageError) as info:
        Registry(PLUGINS).get("twin")
    message = str(info.value)
    assert "plugin name 'twin' is declared by" in message
    assert "'first-dist' (good_plugin:Good)" in message and "'second-dist' (other_plugin:Good)" in message


def test_dist_colon_name_picks_one_of_two_distributions_everywhere(fake_entry_points, tmp_path):
    fake_entry_points("first-dist", {PLUGINS: {"twin": "good_plugin:Good"}}, modules={"good_plugin": GOOD})
    fake_entry_points("second-dist", {PLUGINS: {"twin": "other_plugin:Good"}},
                      modules={"other_plugin": GOOD.replace("A plugin with options.", "The other twin.")})
    with pytest.raises(UsageError, match=r"choose one with --plugins (first|second)-dist:twin \(DIST:NAME\)"):
        Registry(PLUGINS).get("twin")
    assert Registry(PLUGINS).get("second_dist:twin").value == "other_plugin:Good"  # names compare as pip's do
    with pytest.raises(UsageError, match="no distribution 'third-dist' declares plugin 'twin'"):
        Registry(PLUGINS).get("third-dist:twin")

    run = tmp_path / "run"
    args = ["run", "--dataset", "fake", "--epochs", "1", "--device", "cpu", "-q", "--run-dir", str(run),
            "--plugins", "second-dist:twin", "-o", "twin.limit=2"]
    result = CliRunner().invoke(make_cli(), args)
    assert result.exit_code == 0, result.output
    saved = tomllib.loads((run / "config.toml").read_text())
    assert saved["plugins"]["second-dist:twin"] == {"limit": 2.0}  # (typed, and the choice is kept)
    pm = make_plugin_manager()
    load_plugins(pm, resolve_config(run / "config.toml").plugins)  # the saved config repeats the choice
    assert type(pm.get_plugin("twin")).__module__ == "other_plugin" and pm.get_plugin("twin").limit == 2.0
    config = resolve_config(run / "config.toml", plugins=["no:twin"])
    assert not any(key.endswith("twin") for key in config.plugins)


def test_dist_colon_name_picks_a_model_and_the_run_folder_has_no_colon(fake_entry_points, tmp_path):
    for dist in ("first-dist", "second-dist"):
        fake_entry_points(dist, {"trainer.models": {"twin": "trainer_core_plugins.models.mlp:build"}})
    args = ["run", "--dataset", "fake", "--epochs", "1", "--device", "cpu", "-q", "--runs-root", str(tmp_path / "runs")]
    refused = CliRunner().invoke(make_cli(), [*args, "--model", "twin"])
    assert refused.exit_code == 2 and "choose one with --model " in refused.output
    result = CliRunner().invoke(make_cli(), [*args, "--model", "second-dist:twin"])
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("twin-fake-")
    assert tomllib.loads((run / "config.toml").read_text())["model"]["name"] == "second-dist:twin"


class Misspelled:
    @hookimpl
    def on_bach_end(self, trainer):
        pass


class GreedyArguments:
    @hookimpl
    def on_eval(self, trainer, metrics, confusion):
        pass


def test_an_unknown_hook_name_suggests_the_close_one():
    with pytest.raises(PluginError, match=r"plugin 'typo' \(here\) implements unknown hook 'on_bach_end' "
                                          r"\(did you mean 'on_batch_end'\?\)"):
        check_plugin(make_plugin_manager(), "typo", Misspelled(), "here")


def test_an_argument_the_spec_does_not_offer_is_refused():
    with pytest.raises(PluginError, match=r"hook on_eval\(\) asks for confusion, which the spec does not pass; "
                                          r"on_eval offers: trainer, metrics"):
        check_plugin(make_plugin_manager(), "greedy", GreedyArguments(), "here")


def test_a_class_is_checked_before_it_is_instantiated():
    # `trainer plugins` checks classes: `self` must not count as an argument.
    check_plugin(make_plugin_manager(), "recorder", type("P", (), {"on_eval": hookimpl(lambda self, metrics: None)}), "x")
    with pytest.raises(PluginError):
        check_plugin(make_plugin_manager(), "greedy", GreedyArguments, "here")


def test_enabling_a_plugin_twice_is_refused():
    pm = make_plugin_manager()
    register(pm, "x", object())
    with pytest.raises(UsageError, match="plugin 'x' is enabled twice"):
        register(pm, "x", object())


def test_unused_hooks_are_not_registered():
    from trainer_core.pluginmanager import unused_hooks

    class Both:
        def __init__(self, per_step: bool) -> None:
            if not per_step:
                unused_hooks(self, "on_batch_end")

        @hookimpl
        def on_batch_end(self):
            pass

        @hookimpl
        def on_eval(self):
            pass

    pm = make_plugin_manager()
    register(pm, "idle", Both(per_step=False))
    register(pm, "busy", Both(per_step=True))
    assert [i.plugin_name for i in pm.hook.on_batch_end.get_hookimpls()] == ["busy"]
    assert {i.plugin_name for i in pm.hook.on_eval.get_hookimpls()} == {"idle", "busy"}


def test_built_ins_at_their_defaults_leave_no_per_step_hook():
    # Turning every built-in on costs the training steps nothing: per-step work is opt-in.
    pm = make_plugin_manager()
    load_plugins(pm, {"tensorboard": {}, "steplr": {}, "checkpoint": {}, "class-accuracy": {}, "freeze": {},
                      "early-stopping": {}, "progress": {"bar": "off"}})
    per_step = {hook: [i.plugin_name for i in getattr(pm.hook, hook).get_hookimpls()]
                for hook in ("on_batch_start", "on_before_backward", "on_before_optimizer_step", "on_batch_end")}
    assert per_step == {"on_batch_start": [], "on_before_backward": [], "on_before_optimizer_step": [],
                        "on_batch_end": []}


def test_direct_caller_calls_in_pluggys_order_with_the_arguments_each_asks_for():
    from trainer_core.pluginmanager import direct_caller

    calls = []

    def plugin(label, **marks):
        class P:
            @hookimpl(**marks)
            def on_batch_end(self, batch_idx, loss):
                calls.append((label, batch_idx, loss))
                return label  # results are discarded, as the loop ignores them
        return P()

    class OnlyTargets:
        @hookimpl
        def on_batch_end(self, targets):
            calls.append(("targets", targets))

    pm = make_plugin_manager()
    for name, p in [("first", plugin("first")), ("late", plugin("late", trylast=True)),
                    ("second", plugin("second")), ("early", plugin("early", tryfirst=True)),
                    ("targets", OnlyTargets())]:
        register(pm, name, p)
    kwargs = dict(trainer=None, batch_idx=3, inputs=None, targets="t", outputs=None, loss=0.5, optimizer_stepped=True)
    pm.hook.on_batch_end(**kwargs)
    through_pluggy, calls[:] = list(calls), []
    assert direct_caller(pm, "on_batch_end")(**kwargs) is None
    assert calls == through_pluggy
    assert [c[0] for c in calls] == ["early", "targets", "second", "first", "late"]
    assert direct_caller(pm, "on_batch_start") is None  # no implementation: nothing to call


def test_direct_caller_leaves_wrappers_to_pluggy():
    from trainer_core.pluginmanager import direct_caller

    seen = []

    class Wrapper:
        @hookimpl(wrapper=True)
        def on_batch_end(self, batch_idx):
            seen.append(("before", batch_idx))
            result = yield
            seen.append(("after", batch_idx))
            return result

    class Plain:
        @hookimpl
        def on_batch_end(self, batch_idx):
            seen.append(("plain", batch_idx))

    pm = make_plugin_manager()
    register(pm, "plain", Plain())
    register(pm, "wrapper", Wrapper())
    direct_caller(pm, "on_batch_end")(trainer=None, batch_idx=1, inputs=None, targets=None, outputs=None,
                                      loss=None, optimizer_stepped=True)
    assert seen == [("before", 1), ("plain", 1), ("after", 1)]


def test_built_ins_import_only_the_public_api() -> None:
    # What the built-ins need, third-party authors need too: `from trainer_core import ...` only.
    root = Path(__file__).resolve().parent.parent / "plugins"
    private = [f"{path.relative_to(root.parent)}:{number}: {line.strip()}"
               for path in sorted(root.rglob("*.py"))
               for number, line in enumerate(path.read_text().splitlines(), 1)
               if re.match(r"\s*(from trainer_core\.\w+ import|import trainer_core\.)", line)]
    assert private == []
