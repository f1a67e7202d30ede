"""A testing kit for plugin authors (a pytest plugin you opt into).

Enable it in your ``conftest.py``::

    pytest_plugins = ["trainer_core.testing"]

It is never loaded automatically.  It gives you:

* :func:`tiny_data` and :func:`tiny_model`: a learnable synthetic dataset and
  a small network, built in milliseconds;
* :func:`run_tiny`: a real training run on them, in well under a second;
* :class:`HookRecorder`: a plugin that records every hook call in order;
* fixtures ``plugin_manager`` (a fresh manager), ``hook_recorder`` and
  ``fake_entry_points`` (installs entry points as real package metadata in a
  temporary folder, visible to this process and, through ``PYTHONPATH``, to
  subprocesses).
"""

from __future__ import annotations

import inspect
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import pluggy
import pytest

from trainer_core import hookspecs
from trainer_core.pluginmanager import hook_names, hookimpl, make_plugin_manager

if TYPE_CHECKING:
    from torch import nn

    from trainer_core.data import DataBundle
    from trainer_core.trainer import Trainer


def tiny_data(
    num_classes: int = 3, train_size: int = 48, val_size: int = 24, shape: tuple[int, ...] = (1, 4, 4), seed: int = 0
) -> DataBundle:
    """A synthetic dataset a linear model learns in a few steps: ``num_classes``
    classes of ``shape``-shaped float images, ``train_size`` and ``val_size``
    samples, the same for the same ``seed``."""
    from trainer_core_plugins.datasets.fake import load

    return load(
        num_classes=num_classes, train_size=train_size, val_size=val_size, channels=shape[0],
        image_size=shape[1], noise=0.3, seed=seed,
    )


def tiny_model(input_shape: tuple[int, ...] = (1, 4, 4), num_classes: int = 3) -> nn.Module:
    """Flatten, then one hidden layer of 16: small enough for microsecond steps."""
    from math import prod

    from torch import nn

    return nn.Sequential(nn.Flatten(), nn.Linear(prod(input_shape), 16), nn.ReLU(), nn.Linear(16, num_classes))


def run_tiny(
    plugins: Mapping[str, object] | None = None,
    *,
    pm: pluggy.PluginManager | None = None,
    data: DataBundle | None = None,
    model: nn.Module | None = None,
    run_dir: Path | None = None,
    fit: bool = True,
    **settings: Any,
) -> Trainer:
    """Build (and by default fit) a real :class:`Trainer`: by default
    :func:`tiny_model` on :func:`tiny_data`'s 48 training and 24 validation
    samples, that is 3 training batches and 2 validation batches of 16 an epoch.

    :param plugins: plugins to register, by name (the name keys their saved state).
    :param pm: a plugin manager to use (a fresh one when omitted).
    :param data: a :class:`~trainer_core.DataBundle` to train on instead of :func:`tiny_data`
        (your dataset factory's result, to test it in a real run).
    :param model: a model to train instead of :func:`tiny_model` (your model
        factory's result; it must fit ``data``).
    :param run_dir: a folder for the run's files (replaced if it holds a run), or
        ``None`` for none.
    :param fit: ``False`` returns the trainer unstarted, to call hooks on a real trainer.
    :param settings: :class:`~trainer_core.RunConfig` fields; the defaults are
        2 epochs, batch size 16, lr 0.05, the CPU, seed 0 and no default plugins.
    :return: the trainer; after fitting, ``trainer.state`` holds the run's progress and metrics.
    """
    from trainer_core.config import RunConfig
    from trainer_core.rundir import RunDir
    from trainer_core.runtime import seed_everything
    from trainer_core.trainer import Trainer

    config = RunConfig(**{"epochs": 2, "batch_size": 16, "lr": 0.05, "device": "cpu", "plugins": {},
                          "model": "tiny", "dataset": "tiny", **settings})
    data = data or tiny_data()
    seed_everything(config.seed)
    model = model or tiny_model(tuple(data.input_shape), data.num_classes)
    folder = RunDir.create(run_dir, overwrite=True) if run_dir is not None else None
    trainer = Trainer(model, data, config, plugins=plugins, pm=pm, run_dir=folder)
    if fit:
        trainer.fit()
    return trainer


class HookRecorder:
    """A plugin implementing every hook, recording each call in order.

    ``collect_eval_metrics`` returns nothing and ``plugin_state_dict`` returns
    ``None``, so the recorder never changes a run.

    :ivar calls: ``(hook name, {argument: value})`` for every call, in call order;
        the values are the objects the hook got (the trainer, tensors...), not copies.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def names(self) -> list[str]:
        """The hook names called, in order."""
        return [name for name, _ in self.calls]

    def kwargs(self, hook: str) -> list[dict[str, Any]]:
        """The arguments of every call of ``hook``."""
        return [kwargs for name, kwargs in self.calls if name == hook]


def _recording_method(name: str) -> Callable[..., None]:
    args = hookspecs.__dict__[name]
    params = [p for p in inspect.signature(args).parameters]
    # pluggy reads argument names from the code object, so generate a real function.
    source = textwrap.dedent(f"""
        def {name}(self, {', '.join(params)}):
            self.calls.append(({name!r}, {{{', '.join(f'{p!r}: {p}' for p in params)}}}))
    """)
    namespace: dict[str, Any] = {}
    exec(source, namespace)
    return hookimpl(namespace[name])


for _name in hook_names():
    setattr(HookRecorder, _name, _recording_method(_name))


def write_fake_distribution(
    folder: Path,
    distribution: str,
    entry_points: Mapping[str, Mapping[str, str]],
    modules: Mapping[str, str] | None = None,
    version: str = "1.0",
) -> Path:
    """Write real package metadata (and optional module sources) into ``folder``.

    :param entry_points: ``{group: {name: "module:attr"}}``.
    :param modules: ``{"module_name": source}`` files written beside the metadata.
    :return: ``folder``; put it on ``sys.path`` or ``PYTHONPATH``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    info = folder / f"{distribution.replace('-', '_')}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    lines = []
    for group, names in entry_points.items():
        lines.append(f"[{group}]")
        lines.extend(f"{name} = {value}" for name, value in names.items())
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for module, source in (modules or {}).items():
        (folder / f"{module}.py").write_text(textwrap.dedent(source))
    return folder


@pytest.fixture
def plugin_manager() -> pluggy.PluginManager:
    """A fresh plugin manager with the hook specs and no plugins."""
    return make_plugin_manager()


@pytest.fixture
def hook_recorder() -> HookRecorder:
    """A fresh :class:`HookRecorder`: register it with ``run_tiny({"rec": hook_recorder})``."""
    return HookRecorder()


@pytest.fixture
def fake_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Path]]:
    """Install fake distributions for the test: ``fake_entry_points("my-dist",
    {"trainer.plugins": {"mine": "my_mod:Plugin"}}, modules={"my_mod": source})``.

    Each call writes a new folder and puts it first on ``sys.path``; modules
    loaded from it are forgotten after the test.
    """
    count = 0

    def install(distribution: str, entry_points: Mapping[str, Mapping[str, str]], modules: Mapping[str, str] | None = None) -> Path:
        nonlocal count
        count += 1
        folder = write_fake_distribution(tmp_path / f"site-{count}", distribution, entry_points, modules)
        monkeypatch.syspath_prepend(str(folder))
        return folder

    yield install
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]
