"""The exact order of hook events in a run, for a plugin defined here and for
one installed through an entry point."""

import inspect

from trainer_core import hookspecs
from trainer_core.config import RunConfig
from trainer_core.entrypoints import PLUGINS
from trainer_core.pluginmanager import hook_names
from trainer_core.runner import build_run
from trainer_core.testing import HookRecorder, run_tiny

BATCH = ["on_batch_start", "on_before_backward", "on_before_optimizer_step", "on_batch_end"]
EVAL = ["on_eval_start", "on_eval_batch", "on_eval_batch", "collect_eval_metrics", "on_eval", "on_epoch_end"]

# Two epochs of 48 samples in batches of 16 (3 steps), a log every 2 steps,
# 24 validation samples (2 batches).
EXPECTED = (
    ["on_setup", "on_fit_start"]
    + ["on_epoch_start", *BATCH, *BATCH, "on_train_log", *BATCH, "on_train_log", *EVAL]
    + ["on_epoch_start", *BATCH, *BATCH, "on_train_log", *BATCH, "on_train_log", *EVAL]
    + ["on_fit_end", "on_run_end"]
)


def test_event_order_is_exact():
    recorder = HookRecorder()
    run_tiny({"rec": recorder}, log_every_n_steps=2)
    assert recorder.names() == EXPECTED


def test_every_call_carries_exactly_the_documented_arguments():
    recorder = HookRecorder()
    trainer = run_tiny({"rec": recorder})
    for name, kwargs in recorder.calls:
        assert set(kwargs) == set(inspect.signature(getattr(hookspecs, name)).parameters), name
        assert kwargs["trainer"] is trainer
    epochs = [k["epoch"] for k in recorder.kwargs("on_epoch_end")]
    assert epochs == [1, 2]


PLUGIN_SOURCE = """
    from trainer_core.testing import HookRecorder

    class Recorder(HookRecorder):
        '''Records every hook, installed through an entry point.'''
"""


def test_a_plugin_installed_through_an_entry_point_receives_every_hook(fake_entry_points, tmp_path):
    fake_entry_points("trainer-recorder", {PLUGINS: {"recorder": "rec_plugin:Recorder"}}, modules={"rec_plugin": PLUGIN_SOURCE})
    config = RunConfig(dataset="fake", model="smallcnn", epochs=2, batch_size=32, device="cpu",
                       plugins={"recorder": {}}, log_every_n_steps=2, run_dir=str(tmp_path / "run"))
    trainer = build_run(config)
    trainer.fit()
    recorder = trainer.pm.get_plugin("recorder")
    # fake: 96 training samples in batches of 32 (3 steps), 48 validation samples (2 batches).
    assert recorder.names() == EXPECTED
    assert set(recorder.names()) == set(hook_names()) - {"on_exception", "plugin_state_dict", "load_plugin_state"}
