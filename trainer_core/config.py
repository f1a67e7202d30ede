"""The resolved settings of one run: defaults, then a TOML file, then the
command line, checked once before anything is built."""

from __future__ import annotations

import dataclasses
import logging
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

from trainer_core.entrypoints import split_choice
from trainer_core.errors import UsageError
from trainer_core.options import coerce
from trainer_core.suggest import did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger("trainer_core")

DEFAULT_PLUGINS = ("progress", "checkpoint")  # every run leaves its trained model behind (issue 15)
RESERVED_OWNERS = ("model", "dataset", "task")


@dataclass
class RunConfig:
    """Everything a run needs to be built; written to the run folder as ``config.toml``.

    A field is set by its name in a config file (``epochs = 20``) or by its
    ``trainer run`` option; its type decides how a value is read.

    :ivar model_options: the model's options (``-o model.KEY=VALUE``, or the
        ``[model]`` table beside ``name``), each as its declared type.
    :ivar dataset_options: the dataset's options (``-o dataset.KEY=VALUE``, ``[dataset]``).
    :ivar task_options: the task's options (``-o task.KEY=VALUE``, ``[task]``).
    :ivar plugins: the plugins turned on, by name (``DIST:NAME`` for one of two
        distributions' plugins of that name), each with its options
        (``--plugins``, ``-o NAME.KEY=VALUE``, ``[plugins.NAME]``).
    """

    model: str = "smallcnn"
    dataset: str = "digits"
    task: str | None = None
    data_root: str | None = None
    epochs: int = 15
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"
    log_every_n_steps: int = 50
    precision: Literal["32", "bf16", "16"] = "32"
    channels_last: bool = False
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    cuda_graph: bool = False
    accumulate_grad_batches: int = 1
    clip_grad_norm: float | None = None
    nonfinite: Literal["stop", "skip"] = "stop"
    num_workers: int | None = None
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    name: str | None = None
    run_dir: str | None = None
    runs_root: str = "runs"
    model_options: dict[str, Any] = field(default_factory=dict)
    dataset_options: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    plugins: dict[str, dict[str, Any]] = field(default_factory=lambda: {name: {} for name in DEFAULT_PLUGINS})

    def validate(self) -> RunConfig:
        """Raise :class:`UsageError` for a value out of range; return self."""
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1 (got {self.epochs})"),
            (0 <= self.seed < 2**32, f"seed must be between 0 and 2**32 - 1 = {2**32 - 1} (got {self.seed})"),
            (self.batch_size >= 1, f"batch_size must be >= 1 (got {self.batch_size})"),
            (self.lr > 0, f"lr must be > 0 (got {self.lr})"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1) (got {self.momentum})"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0 (got {self.weight_decay})"),
            (self.log_every_n_steps >= 1, f"log_every_n_steps must be >= 1 (got {self.log_every_n_steps})"),
            (self.accumulate_grad_batches >= 1,
             f"accumulate_grad_batches must be >= 1 (got {self.accumulate_grad_batches})"),
            (self.clip_grad_norm is None or self.clip_grad_norm > 0,
             f"clip_grad_norm must be > 0 (got {self.clip_grad_norm})"),
            (self.compile or self.compile_mode == "default",
             f"compile_mode {self.compile_mode!r} needs compile = true (add --compile)"),
            (self.num_workers is None or self.num_workers >= 0, f"num_workers must be >= 0 (got {self.num_workers})"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        return self

    def to_toml(self) -> dict[str, Any]:
        """A TOML-ready mapping that :func:`load_config` reads back to an equal config."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in RESERVED_OWNERS and (value is not None or getattr(self, f"{f.name}_options")):
                name = {"name": value} if value is not None else {}
                out[f.name] = {**name, **getattr(self, f"{f.name}_options")}
            elif f.name == "plugins":
                out["plugins"] = {name: dict(opts) for name, opts in value.items()}
                out["plugins"].update({name: False for name in DEFAULT_PLUGINS if name not in value})
            elif not f.name.endswith("_options") and value is not None:
                out[f.name] = value
        return out


# Settings with a single value, settable by name from a file or the command line.
SCALAR_FIELDS = {
    name: hint
    for name, hint in typing.get_type_hints(RunConfig).items()
    if name not in ("model_options", "dataset_options", "task_options", "plugins")
}


def set_field(config: RunConfig, key: str, value: Any, where: str) -> None:
    """Coerce ``value`` to the type of ``key`` and set it; unknown keys are errors."""
    if key not in SCALAR_FIELDS:
        raise UsageError(f"unknown setting '{key}' in {where}{did_you_mean(key, SCALAR_FIELDS)}; "
                         f"known settings: {', '.join(SCALAR_FIELDS)}")
    try:
        setattr(config, key, coerce(value, SCALAR_FIELDS[key]))
    except ValueError:
        raise UsageError(f"setting '{key}' in {where} has invalid value {value!r} "
                         f"(expected {_describe(SCALAR_FIELDS[key])})") from None


def _describe(annotation: Any) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(args)
    names = [getattr(a, "__name__", str(a)) for a in args] or [getattr(annotation, "__name__", str(annotation))]
    return " or ".join(n.replace("NoneType", "nothing") for n in names)


def load_config(path: Path, config: RunConfig | None = None) -> RunConfig:
    """Read a TOML config file onto ``config`` (defaults when omitted)."""
    config = config or RunConfig()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"config file {path} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    return apply_mapping(config, data, f"config file {path}")


def apply_mapping(config: RunConfig, data: Mapping[str, Any], where: str) -> RunConfig:
    """Apply a parsed config (a TOML file, or the one saved in a checkpoint) onto ``config``."""
    for key, value in data.items():
        if key in RESERVED_OWNERS and isinstance(value, dict):
            options = dict(value)
            if "name" in options:
                set_field(config, key, options.pop("name"), where)
            getattr(config, f"{key}_options").update(options)
        elif key == "plugins":
            _apply_plugin_table(config, value, where)
        else:
            set_field(config, key, value, where)
    return config


def _apply_plugin_table(config: RunConfig, table: Any, where: str) -> None:
    if not isinstance(table, dict):
        raise UsageError(f"'plugins' in {where} must be a table: write [plugins.NAME] sections")
    for name, value in table.items():
        if value is False:
            _turn_off(config, name)
        elif value is True:
            _turn_on(config, name)
        elif isinstance(value, dict):
            config.plugins[_turn_on(config, name)].update(value)
        else:
            raise UsageError(f"plugins.{name} in {where} must be a table of options, true or false")


def plugin_key(plugins: Mapping[str, Any], name: str) -> str | None:
    """The key of ``plugins`` that turns on plugin ``name`` (``NAME`` or ``DIST:NAME``), if any."""
    wanted = split_choice(name)[1]
    return next((key for key in plugins if split_choice(key)[1] == wanted), None)


def _turn_on(config: RunConfig, spec: str) -> str:
    """Turn on the plugin ``spec`` names and return its key.  ``DIST:NAME`` (the
    plugin of one distribution, when two declare ``NAME``) takes the place of the
    plugin's key, keeping its options; a plain name keeps a choice made before."""
    key = plugin_key(config.plugins, spec)
    if key is None or (split_choice(spec)[0] is not None and key != spec):
        config.plugins[spec] = config.plugins.pop(key, {}) if key is not None else {}
        return spec
    return key


def _turn_off(config: RunConfig, spec: str) -> None:
    key = plugin_key(config.plugins, spec)
    if key is not None:
        del config.plugins[key]


def apply_plugin_list(config: RunConfig, spec: Iterable[str]) -> None:
    """Enable ``name`` (or ``DIST:name``, the one of distribution ``DIST``) or disable
    ``no:name`` for each comma-separated entry."""
    for item in (part.strip() for chunk in spec for part in chunk.split(",")):
        if not item:
            continue
        if item.startswith("no:"):
            _turn_off(config, item[3:])
        else:
            _turn_on(config, item)


def apply_option_overrides(config: RunConfig, overrides: Iterable[str]) -> None:
    """Apply ``-o owner.key=value`` overrides for plugins, the model and the dataset."""
    for text in overrides:
        owner_key, sep, value = text.partition("=")
        owner, dot, key = owner_key.strip().partition(".")
        if not sep or not dot or not owner or not key:
            raise UsageError(f"option '{text}' is not of the form NAME.KEY=VALUE (e.g. -o steplr.gamma=0.5)")
        if owner in RESERVED_OWNERS:
            getattr(config, f"{owner}_options")[key] = value
        elif (plugin := plugin_key(config.plugins, owner)) is not None:
            config.plugins[plugin][key] = value
        else:
            raise UsageError(f"option '{owner}.{key}' is for plugin '{owner}', which is not enabled; add --plugins {owner}")


# Settings that choose where a run writes: from the command line or a config file, never from a checkpoint.
WRITE_LOCATIONS = ("run_dir", "runs_root", "name")


def without_write_locations(saved: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A checkpoint's saved config without the settings that choose where a run
    writes (``run_dir``, ``runs_root``, ``name`` and plugin options that are paths,
    such as ``checkpoint.dirpath``), and the names of those it held: a file a run
    reads never chooses where it writes."""
    from trainer_core.entrypoints import PLUGINS, Registry
    from trainer_core.options import options_of

    cleaned = {key: value for key, value in saved.items() if key not in WRITE_LOCATIONS}
    dropped = [key for key in WRITE_LOCATIONS if key in saved]
    table = saved.get("plugins")
    if isinstance(table, dict):
        registry, plugins = Registry(PLUGINS), {}
        for name, options in table.items():
            if not isinstance(options, dict):  # true / false: on or off
                plugins[name] = options
                continue
            try:
                paths = {o.name for o in options_of(registry.get(name).load()) if o.is_path} if options else set()
            except Exception:  # (a plugin not installed here: the run refuses it when it loads the plugins)
                paths = set()
            plugins[name] = {key: value for key, value in options.items() if key not in paths}
            dropped += [f"plugins.{name}.{key}" for key in sorted(paths & options.keys())]
        cleaned["plugins"] = plugins
    return cleaned, dropped


def resolve_config(
    config_file: Path | None = None,
    settings: Mapping[str, Any] | None = None,
    plugins: Iterable[str] = (),
    overrides: Iterable[str] = (),
    base: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Defaults, then ``base`` (a resumed run's saved config, less where it
    wrote: :func:`without_write_locations`), then ``config_file``, then
    command-line ``settings`` (``None`` values are skipped), the ``--plugins``
    list and ``-o`` overrides."""
    config = RunConfig()
    if base is not None:
        base, dropped = without_write_locations(base)
        apply_mapping(config, base, "the checkpoint's config")
        if any(name.startswith("plugins.") for name in dropped):
            log.warning("resume: %s from the checkpoint not used (where a run writes comes from the command line or a "
                        "config file; give it again there to keep it)", ", ".join(n for n in dropped if n.startswith("plugins.")))
    if config_file is not None:
        load_config(config_file, config)
    for key, value in (settings or {}).items():
        if value is not None:
            set_field(config, key, value, "the command line")
    apply_plugin_list(config, plugins)
    apply_option_overrides(config, overrides)
    return config.validate()


def flat_settings(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``("a.b.c", value)`` pairs of a nested mapping (a config's tables, as
    :meth:`RunConfig.to_toml` gives them), for trackers that take flat names."""
    pairs: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            pairs.extend(flat_settings(value, f"{prefix}{key}."))
        else:
            pairs.append((f"{prefix}{key}", value))
    return pairs
