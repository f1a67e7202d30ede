"""trainer-core: a small hook-driven PyTorch training loop; everything else is a plugin.

The public API for plugin authors::

    from trainer_core import hookimpl, Trainer, UsageError

Importing this package is cheap: torch is loaded only when a name that needs
it (``Trainer``, ``DataBundle``, ...) is first used.
"""

from __future__ import annotations


def _forget_working_directory() -> None:
    """Under ``python -m trainer_core`` (also how torchrun starts a run's
    processes), Python put the working directory first on ``sys.path``: drop it
    before anything is imported, so that no module in the folder a run starts
    from (a ./plugins, ./pluggy.py, ./json.py...) replaces ours or a library's."""
    import os
    import sys

    if sys.argv[:1] == ["-m"] and "trainer_core" in getattr(sys, "orig_argv", ["trainer_core"]) and sys.path \
            and os.path.abspath(sys.path[0] or os.curdir) == os.getcwd():
        del sys.path[0]  # (sys.argv[0] is "-m" only while Python imports the package to run)


_forget_working_directory()
del _forget_working_directory

import importlib  # noqa: E402 (after the line above, on purpose)
from typing import TYPE_CHECKING, Any

from trainer_core.distributed import rank_zero_only
from trainer_core.errors import PluginError, TrainerError, UsageError
from trainer_core.hookspecs import hookspec
from trainer_core.pluginmanager import hookimpl, make_plugin_manager, unused_hooks

__version__ = "0.1.0"

_LAZY = {
    "Trainer": "trainer_core.trainer",
    "Task": "trainer_core.task",
    "metric_mode": "trainer_core.task",
    "held_targets": "trainer_core.data",
    "read_sample": "trainer_core.loading",
    "named_best_checkpoint": "trainer_core.checkpointing",
    "flat_settings": "trainer_core.config",
    "TrainState": "trainer_core.state",
    "RunConfig": "trainer_core.config",
    "DataBundle": "trainer_core.data",
    "TensorSplit": "trainer_core.data",
    "build_run": "trainer_core.runner",
    "load_weights": "trainer_core.checkpointing",
    "load_checkpoint": "trainer_core.checkpointing",
    "save_checkpoint": "trainer_core.checkpointing",
    "remove_checkpoint": "trainer_core.checkpointing",
    "checkpoint_weights": "trainer_core.checkpointing",
    "find_checkpoint": "trainer_core.checkpointing",
    "newest_checkpoint": "trainer_core.checkpointing",
    "CHECKPOINT_FOLDER": "trainer_core.checkpointing",
    "LAST_CHECKPOINT": "trainer_core.checkpointing",
    "resolve_monitor": "trainer_core.metrics",
    "check_monitor": "trainer_core.metrics",
    "check_saved_state": "trainer_core.resumecheck",
    "metric_keys": "trainer_core.metrics",
    "atomic_write_bytes": "trainer_core.files",
    "did_you_mean": "trainer_core.suggest",
    "read_safetensors": "trainer_core.safetensors_file",
    "write_safetensors": "trainer_core.safetensors_file",
    "export_info": "trainer_core.safetensors_file",
    "loaded_weights": "trainer_core.transfer",
    "LoadedWeights": "trainer_core.transfer",
    "Normalization": "trainer_core.transfer",
}

__all__ = ["PluginError", "TrainerError", "UsageError", "hookimpl", "hookspec", "make_plugin_manager", "rank_zero_only",
           "unused_hooks", "__version__", *_LAZY]

if TYPE_CHECKING:
    from trainer_core.checkpointing import (CHECKPOINT_FOLDER, LAST_CHECKPOINT, checkpoint_weights, find_checkpoint,
                                            load_checkpoint, load_weights, named_best_checkpoint, newest_checkpoint, remove_checkpoint,
                                            save_checkpoint)
    from trainer_core.files import atomic_write_bytes
    from trainer_core.metrics import check_monitor, metric_keys, resolve_monitor
    from trainer_core.config import RunConfig, flat_settings
    from trainer_core.data import DataBundle, TensorSplit, held_targets
    from trainer_core.loading import read_sample
    from trainer_core.resumecheck import check_saved_state
    from trainer_core.runner import build_run
    from trainer_core.state import TrainState
    from trainer_core.safetensors_file import export_info, read_safetensors, write_safetensors
    from trainer_core.suggest import did_you_mean
    from trainer_core.transfer import LoadedWeights, Normalization, loaded_weights
    from trainer_core.task import Task, metric_mode
    from trainer_core.trainer import Trainer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trainer_core' has no attribute '{name}'")
