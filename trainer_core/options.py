"""Options of plugins, models and datasets: the typed keyword arguments of
their constructor or factory, coerced from strings (``-o name.key=value``) or
TOML values by annotation."""

from __future__ import annotations

import inspect
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from trainer_core.errors import UsageError
from trainer_core.suggest import did_you_mean

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}


@dataclass(frozen=True)
class Option:
    """One keyword argument a plugin, model or dataset accepts."""

    name: str
    annotation: Any
    default: Any

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    def type_name(self) -> str:
        return _type_name(self.annotation)

    @property
    def is_path(self) -> bool:
        """Whether the option names a file or folder (annotated ``Path``, or ``Path | None``)."""
        return self.annotation is Path or Path in typing.get_args(self.annotation)

    def describe(self) -> str:
        text = f"{self.name}: {self.type_name()}"
        return text if self.required else f"{text} = {self.default!r}"


def options_of(target: Callable[..., Any], skip: tuple[str, ...] = ()) -> list[Option]:
    """The options ``target`` (a class or function) takes, minus ``skip``."""
    func = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # unresolvable annotations: accept values as given
        hints = {}
    found = []
    for param in inspect.signature(func).parameters.values():
        if param.name in ("self", *skip) or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        found.append(Option(param.name, hints.get(param.name, Any), param.default))
    return found


def bind_options(
    target: Callable[..., Any], raw: Mapping[str, Any], owner: str, skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Check ``raw`` against ``target``'s options and coerce each value.

    ``owner`` names the options in errors (``steplr`` gives ``steplr.gamma``).
    """
    accepted = {opt.name: opt for opt in options_of(target, skip)}
    listing = ", ".join(opt.describe() for opt in accepted.values()) or "none"
    bound = {}
    for key, value in raw.items():
        opt = accepted.get(key)
        if opt is None:
            raise UsageError(
                f"unknown option '{owner}.{key}'{did_you_mean(key, accepted)}; {owner} accepts: {listing}"
            )
        try:
            bound[key] = coerce(value, opt.annotation)
        except ValueError:
            raise UsageError(
                f"option {owner}.{key}={value!r} is not a valid {opt.type_name()}; {owner} accepts: {listing}"
            ) from None
    missing = [name for name, opt in accepted.items() if opt.required and name not in bound]
    if missing:
        raise UsageError(
            f"{owner} needs option '{missing[0]}' (set it with -o {owner}.{missing[0]}=VALUE); {owner} accepts: {listing}"
        )
    return bound


def stored_options(
    target: Callable[..., Any], raw: Mapping[str, Any], owner: str, skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``raw`` options (checked by :func:`bind_options`) as their declared types, in
    the form a TOML file holds them: a run's ``config.toml`` then says ``step_size =
    1``, not the ``"1"`` that ``-o`` gave.  TOML has no null, so ``None`` stays
    ``"none"``; paths are strings: :func:`coerce` reads both back."""
    return {key: _toml_value(value) for key, value in bind_options(target, raw, owner, skip).items()}


def _toml_value(value: Any) -> Any:
    if value is None:
        return "none"
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_toml_value(item) for item in value]
    return value


def coerce(value: Any, annotation: Any) -> Any:
    """Convert ``value`` (a string from the command line or a TOML value) to
    ``annotation``; raise ``ValueError`` when it does not fit."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in _NONE)):
            return None
        for member in args:
            if member is type(None):
                continue
            try:
                return coerce(value, member)
            except ValueError:
                continue
        raise ValueError(value)
    if origin is Literal:
        for choice in args:
            try:
                if coerce(value, type(choice)) == choice:
                    return choice
            except ValueError:
                continue
        raise ValueError(value)
    if origin in (list, tuple):
        items = [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError(value)
        member = args[0] if args else Any
        return origin(coerce(item, member) for item in items)
    return _coerce_scalar(value, annotation)


def _coerce_scalar(value: Any, kind: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            return int(value.strip())
        raise ValueError(value)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value.strip())
        raise ValueError(value)
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. precision = 16 in a TOML file
        raise ValueError(value)
    if kind is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ValueError(value)
    return value


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return "|".join(repr(a) if not isinstance(a, str) else a for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) if a is not type(None) else "none" for a in args)
    if origin in (list, tuple):
        return f"list of {_type_name(args[0]) if args else 'values'}"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))
