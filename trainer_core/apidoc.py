"""``docs/api.md``: the reference for plugin, model and dataset authors, generated
from the docstrings of what they use (the trainer a hook receives, its progress,
the run's settings, what a dataset returns, the testing kit).

:mod:`trainer_core.docgen` writes it beside the hook reference and checks it;
a member without a docstring is an error here, so the page has no gaps.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any, Callable

from trainer_core.docgen import doc_fields, inline, rst_to_markdown

API_DOC = Path("docs/api.md")


def render_api() -> str:
    """The whole of ``docs/api.md``."""
    from trainer_core import testing
    from trainer_core.config import RunConfig
    from trainer_core.data import DataBundle, TensorSplit
    from trainer_core.plugin_api import PluginAPI
    from trainer_core.snapshot import Checkpoints
    from trainer_core.state import TrainState
    from trainer_core.trainer import Trainer

    parts = [
        "# API reference for plugin, model and dataset authors",
        "",
        "<!-- Generated from the docstrings by `python -m trainer_core.docgen`; do not edit by hand. -->",
        "",
        "Everything here is imported from `trainer_core` (the testing kit from `trainer_core.testing`). "
        "The hooks themselves are in [hooks.md](hooks.md); [the plugin guide](plugins.md) shows them at work.",
        "",
        "- [The trainer a hook receives](#the-trainer-a-hook-receives)",
        "- [TrainState](#trainstate)",
        "- [RunConfig](#runconfig)",
        "- [Datasets: DataBundle and TensorSplit](#datasets-databundle-and-tensorsplit)",
        "- [Models](#models)",
        "- [The testing kit](#the-testing-kit)",
        "",
        "## The trainer a hook receives",
        "",
        rst_to_markdown(_prose(PluginAPI)),
        "",
        "### Attributes",
        "",
        *_attribute_table(PluginAPI),
        "",
        "### Properties and methods",
    ]
    # What plugins call: the plugin-facing layers of the Trainer, and an extra evaluation (not fit()).
    members = [(n, m) for cls in (PluginAPI, Checkpoints) for n, m in vars(cls).items() if _public(n, m)]
    for name, member in [*members, ("evaluate", vars(Trainer)["evaluate"])]:
        parts += _member("trainer.", name, member, "####")
    parts += ["", "## TrainState", "", rst_to_markdown(_prose(TrainState)), "", *_dataclass_table(TrainState)]
    parts += ["", "## RunConfig", "", rst_to_markdown(_prose(RunConfig)), "", *_settings_table(RunConfig)]
    parts += ["", "## Datasets: DataBundle and TensorSplit", "",
              "A dataset is a function registered in the `trainer.datasets` entry-point group that returns a "
              "`DataBundle`; its keyword arguments are its options (`-o dataset.KEY=VALUE`), except `data_root`, "
              "which receives `--data-root`. Raise `ValueError` for a bad option value."]
    for cls in (DataBundle, TensorSplit):
        parts += ["", f"### {cls.__name__}", "", rst_to_markdown(_prose(cls)), "", *_dataclass_table(cls)]
        parts += [line for n, m in vars(cls).items() if isinstance(m, property) for line in _member("data.", n, m, "####")]
    parts += ["", "## Models", "",
              "A model is a function registered in the `trainer.models` entry-point group, called as "
              "`build(input_shape=..., num_classes=..., **options)`, that returns an `nn.Module`: `input_shape` is "
              "the dataset's `DataBundle.input_shape`, `num_classes` the outputs per sample the task asks for "
              "(classes, regression targets, labels, vocabulary). Its other keyword arguments are its options "
              "(`-o model.KEY=VALUE`); raise `ValueError` for a bad value.",
              "", "## The testing kit", "", rst_to_markdown(_prose(testing))]
    for name in ("run_tiny", "tiny_data", "tiny_model", "write_fake_distribution"):
        parts += _member("", name, getattr(testing, name), "###")
    parts += ["", "### HookRecorder", "", rst_to_markdown(_prose(testing.HookRecorder)), "",
              *_ivar_list(testing.HookRecorder)]
    for name in ("names", "kwargs"):
        parts += _member("recorder.", name, vars(testing.HookRecorder)[name], "####")
    parts += ["", "### Fixtures", ""]
    for name in ("plugin_manager", "hook_recorder", "fake_entry_points"):
        parts.append(f"- `{name}`: {inline(' '.join(_prose(getattr(testing, name)).split()))}")
    return "\n".join(parts).rstrip() + "\n"


def _public(name: str, member: Any) -> bool:
    return not name.startswith("_") and (inspect.isfunction(member) or isinstance(member, property))


def _prose(target: Any) -> str:
    doc = inspect.getdoc(target)
    if not doc:
        raise ValueError(f"{getattr(target, '__qualname__', target)} has no docstring; docs/api.md shows it")
    return doc_fields(doc)[0]


def _cell(text: str) -> str:
    return inline(" ".join(text.split())).replace("|", "\\|")


def _ivars(cls: type) -> dict[str, str]:
    return {name: text for kind, name, text in doc_fields(inspect.getdoc(cls) or "")[1] if kind == "ivar"}


def _ivar_list(cls: type) -> list[str]:
    return [f"- `{name}`: {inline(text)}" for name, text in _ivars(cls).items()]


def _attribute_table(cls: type) -> list[str]:
    """A table of the attributes ``cls`` documents (``:ivar:``), with their annotations."""
    annotations = inspect.get_annotations(cls)
    rows = ["| attribute | type | what |", "|---|---|---|"]
    for name, text in _ivars(cls).items():
        if name not in annotations:
            raise ValueError(f"{cls.__name__} documents attribute {name!r}, which it does not declare")
        rows.append(f"| `trainer.{name}` | `{_cell(str(annotations[name]))}` | {_cell(text)} |")
    return rows


def _default(field: dataclasses.Field[Any]) -> str:
    if field.default is not dataclasses.MISSING:
        return f"`{field.default!r}`"
    if field.default_factory is not dataclasses.MISSING:
        return f"`{field.default_factory()!r}`"
    return "required"


def _dataclass_table(cls: type) -> list[str]:
    """A dataclass's public fields: type, default and what its docstring says (every one must say)."""
    texts = _ivars(cls)
    rows = ["| field | type | default | what |", "|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        if field.repr is False:  # (bookkeeping, not for readers)
            continue
        if field.name not in texts:
            raise ValueError(f"{cls.__name__}.{field.name} is not documented (:ivar {field.name}:)")
        rows.append(f"| `{field.name}` | `{_cell(str(field.type))}` | {_cell(_default(field))} | {_cell(texts[field.name])} |")
    return rows


def _settings_table(cls: type) -> list[str]:
    """:class:`~trainer_core.RunConfig`'s fields, each with its ``trainer run`` option, described
    by its ``:ivar:`` or, for most, the option's help (the one text users see)."""
    from trainer_core.cli import make_cli

    run = make_cli().commands["run"]
    options = {p.name: p for p in run.params if p.name}
    texts = _ivars(cls)
    rows = ["| setting (TOML key) | `trainer run` option | type | default | what |", "|---|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        option = options.get(field.name)
        help_text = re.sub(r"\s*\[default: [^]]*\]$", "", getattr(option, "help", None) or "")
        text = texts.get(field.name) or help_text
        if not text:
            raise ValueError(f"RunConfig.{field.name} has neither an :ivar: nor a trainer run option with help")
        flag = f"`{max(option.opts, key=len)}`" if option is not None else "—"
        rows.append(f"| `{field.name}` | {flag} | `{_cell(str(field.type))}` | {_cell(_default(field))} | {_cell(text)} |")
    return rows


class _Written(str):
    """An annotation as its source spells it (they are strings here: ``from __future__ import annotations``)."""

    def __repr__(self) -> str:
        return str(self)


def _as_written(signature: inspect.Signature) -> inspect.Signature:
    """``signature`` without ``self``, its annotations unquoted; defaults keep their ``repr``."""
    def written(annotation: Any) -> Any:
        return _Written(annotation) if isinstance(annotation, str) else annotation

    params = [p.replace(annotation=written(p.annotation)) for p in signature.parameters.values() if p.name != "self"]
    return signature.replace(parameters=params, return_annotation=written(signature.return_annotation))


def _member(prefix: str, name: str, member: Any, heading: str) -> list[str]:
    """A heading, the signature and the docstring (prose, arguments, return) of a function or property."""
    function: Callable[..., Any] = member.fget if isinstance(member, property) else member
    signature = _as_written(inspect.signature(function))
    if isinstance(member, property):
        shown = f"{prefix}{name}" + (f" -> {signature.return_annotation}" if signature.return_annotation is not signature.empty else "")
    else:
        shown = f"{prefix}{name}{signature}"
    doc = inspect.getdoc(function)
    if not doc:
        raise ValueError(f"{getattr(function, '__qualname__', name)} has no docstring; docs/api.md shows it")
    prose, fields = doc_fields(doc)
    parts = ["", f"{heading} {prefix}{name}", "", "```python", shown, "```", "", rst_to_markdown(prose)]
    params = [(n, text) for kind, n, text in fields if kind == "param"]
    if params:
        parts += ["", "Arguments:", ""] + [f"- `{n}`: {inline(text)}" for n, text in params]
    returns = next((text for kind, _, text in fields if kind == "return"), "")
    if returns:
        parts += ["", f"Returns: {inline(returns)}"]
    return parts
