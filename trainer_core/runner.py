"""Build a run from its config: plugins, dataset, task and model from their
entry points, the run folder, and the :class:`Trainer` that ties them together.

Everything that can be wrong with the input is found here, before the run
folder is created, so a bad command leaves nothing behind.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Mapping

import pluggy
from torch import nn

from trainer_core.checkpointing import describe_misfit
from trainer_core.config import RunConfig
from trainer_core.data import DataBundle
from trainer_core.distributed import broadcast_object, check_config, init_for_library, rank
from trainer_core.entrypoints import DATASETS, FACTORY_ARGUMENTS, MODELS, PLUGINS, TASKS, Registry, split_choice
from trainer_core.errors import UsageError
from trainer_core.options import bind_options, stored_options
from trainer_core.pluginmanager import instantiate, make_plugin_manager, register
from trainer_core.rundir import RunDir, default_run_path
from trainer_core.runtime import seed_everything, select_device
from trainer_core.sharded import check_layout
from trainer_core.strategy import check_strategy
from trainer_core.task import check_fit, load_task, task_name
from trainer_core.trainer import Trainer
from trainer_core.transfer import warn_on_normalization


def load_plugins(pm: pluggy.PluginManager, wanted: Mapping[str, Mapping[str, Any]]) -> None:
    """Load, configure, check and register each wanted plugin by entry-point name
    (``NAME``, or ``DIST:NAME`` when two distributions declare ``NAME``)."""
    registry = Registry(PLUGINS)
    for name, options in wanted.items():
        entry = registry.get(name)
        register(pm, entry.name, instantiate(entry, options), origin=entry.describe())


def load_dataset(name: str, options: Mapping[str, Any], data_root: str | None) -> DataBundle:
    entry = Registry(DATASETS).get(name)
    factory = entry.load()
    kwargs = bind_options(factory, options, owner="dataset", skip=FACTORY_ARGUMENTS[DATASETS])
    if "data_root" in inspect.signature(factory).parameters:
        kwargs["data_root"] = Path(data_root) if data_root else None
    elif data_root:
        raise UsageError(f"dataset '{name}' takes no --data-root (it ships its own data)")
    try:
        data = factory(**kwargs)
    except ValueError as exc:  # the factory's own check of its options
        raise UsageError(f"dataset '{name}': {exc}") from None
    if not isinstance(data, DataBundle):
        raise UsageError(f"dataset '{name}' ({entry.describe()}) returned {type(data).__name__}, not a DataBundle")
    return data


def build_model(name: str, options: Mapping[str, Any], data: DataBundle, outputs: int) -> nn.Module:
    """The model registered as ``name`` for ``data``, with ``outputs`` values per
    sample (its factory's ``num_classes``: what the task's :meth:`~trainer_core.Task.output_size` says)."""
    entry = Registry(MODELS).get(name)
    factory = entry.load()
    kwargs = bind_options(factory, options, owner="model", skip=FACTORY_ARGUMENTS[MODELS])
    try:
        model = factory(input_shape=tuple(data.input_shape), num_classes=outputs, **kwargs)
    except ValueError as exc:
        raise UsageError(f"model '{name}': {exc}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"model '{name}' ({entry.describe()}) returned {type(model).__name__}, not an nn.Module")
    return model


def keep_typed_options(config: RunConfig) -> None:
    """Hold every option of ``config`` as its declared type (:func:`~trainer_core.options.stored_options`),
    so that ``config.toml`` and checkpoints record ``step_size = 1``, not ``-o``'s ``"1"``."""
    plugins = Registry(PLUGINS)
    config.plugins = {key: stored_options(plugins.get(key).load(), raw, key) if raw else raw
                      for key, raw in config.plugins.items()}
    for owner, group in (("model", MODELS), ("dataset", DATASETS), ("task", TASKS)):
        raw = getattr(config, f"{owner}_options")
        if raw:
            factory = Registry(group).get(getattr(config, owner)).load()
            setattr(config, f"{owner}_options", stored_options(factory, raw, owner, FACTORY_ARGUMENTS.get(group, ())))


def run_path_for(config: RunConfig) -> Path:
    if config.run_dir:
        return Path(config.run_dir)
    root = Path(config.runs_root)
    if config.name:
        return root / config.name
    # (a DIST:NAME choice names the folder by NAME: no colon in a path)
    return default_run_path(root, split_choice(config.model)[1], split_choice(config.dataset)[1])


def build_run(
    config: RunConfig,
    *,
    pm: pluggy.PluginManager | None = None,
    resume: Mapping[str, Any] | None = None,
    run_path: Path | None = None,
    overwrite: bool = False,
    write_files: bool = True,
    restart: bool = False,
    continues: bool | None = None,
) -> Trainer:
    """Resolve ``config`` into a ready :class:`Trainer`.

    :param resume: a loaded checkpoint to continue from.
    :param run_path: the run folder (derived from ``config`` when omitted).
    :param overwrite: replace the run the folder holds.
    :param write_files: ``False`` builds a run that writes no folder.
    :param restart: start afresh in the folder of a run that left no checkpoint.
    :param continues: whether the resumed run continues the run the folder holds
        (default: whenever ``resume`` is given); otherwise a folder that holds a run is refused
        unless ``overwrite``.
    """
    pm = pm or make_plugin_manager()
    init_for_library(select_device(config.device))  # joins torchrun's process group, if launched by it
    check_config(config)
    check_strategy(config)
    load_plugins(pm, config.plugins)
    data = load_dataset(config.dataset, config.dataset_options, config.data_root)
    task = load_task(task_name(config.task, data), config.task_options)
    check_fit(task, data, config.dataset)
    config.task = task.name  # recorded, so eval, predict and export rebuild the same task
    seed_everything(config.seed)
    model = build_model(config.model, config.model_options, data, task.output_size(data))
    if resume is None and rank() == 0:  # (a resumed run was told when it started)
        warn_on_normalization(model, data)
    if resume is not None:
        check_layout(resume, config.strategy == "fsdp")
    if resume is not None and isinstance(resume.get("model"), Mapping):
        # Refused here, before the run folder (often the resumed run's own) is touched.
        try:
            model.load_state_dict(resume["model"])
        except RuntimeError:
            raise UsageError(describe_misfit(model.state_dict(), resume["model"])) from None
    keep_typed_options(config)
    run_dir = None
    if write_files:
        # The default name holds the time: every rank takes rank zero's choice, and only rank zero writes.
        path = broadcast_object(run_path or run_path_for(config))
        if rank() == 0:
            reopen = resume is not None if continues is None else continues
            run_dir = RunDir.create(path, resume=reopen, overwrite=overwrite, restart=restart)
            try:
                run_dir.write_config(config.to_toml())
            except BaseException:
                run_dir.finish(None, failed=True)
                raise
        else:
            run_dir = RunDir(path)
    try:
        return Trainer(model, data, config, task=task, pm=pm, run_dir=run_dir, resume=resume)
    except BaseException as exc:
        if run_dir is not None:  # (bad input: a folder this run made goes again)
            run_dir.finish(None, failed=True, discard=isinstance(exc, UsageError))
        raise
