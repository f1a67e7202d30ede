"""Discovery of plugins, models, datasets and tasks through entry points.

Listing reads package metadata only; nothing is imported until :meth:`Entry.load`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from trainer_core.errors import PluginError, UsageError
from trainer_core.suggest import did_you_mean

PLUGINS = "trainer.plugins"
MODELS = "trainer.models"
DATASETS = "trainer.datasets"
TASKS = "trainer.tasks"

_KIND = {PLUGINS: "plugin", MODELS: "model", DATASETS: "dataset", TASKS: "task"}
# How a user names an entry on the command line, to choose between two distributions' entries.
_CHOOSE = {PLUGINS: "--plugins", MODELS: "--model", DATASETS: "--dataset", TASKS: "--task"}
# The arguments the trainer passes a factory itself: the others are the factory's options.
FACTORY_ARGUMENTS = {MODELS: ("input_shape", "num_classes"), DATASETS: ("data_root",)}


def split_choice(spec: str) -> tuple[str | None, str]:
    """``"DIST:NAME"`` (the entry ``NAME`` of distribution ``DIST``) as ``(DIST, NAME)``;
    a plain ``NAME`` as ``(None, NAME)``."""
    dist, sep, name = spec.rpartition(":")
    return (dist, name) if sep and dist else (None, spec)


def _normalized(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()  # as pip compares names (PEP 503)


@dataclass(frozen=True)
class Entry:
    """One named entry point: where it lives and which distribution declares it."""

    name: str
    value: str
    group: str
    distribution: str

    @property
    def kind(self) -> str:
        return _KIND.get(self.group, self.group)

    def describe(self) -> str:
        return f"entry point '{self.name} = {self.value}' of distribution '{self.distribution}'"

    def load(self) -> Any:
        """Import and return the object the entry point names."""
        try:
            return metadata.EntryPoint(self.name, self.value, self.group).load()
        except Exception as exc:
            raise PluginError(
                f"{self.kind} '{self.name}' failed to import ({self.describe()}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc


class Registry:
    """The entries of one entry-point group, read fresh from the installed metadata."""

    def __init__(self, group: str) -> None:
        self.group = group
        self.kind = _KIND.get(group, group)
        self._by_name: dict[str, list[Entry]] = {}
        for ep in metadata.entry_points(group=group):
            dist = ep.dist.name if ep.dist is not None else "unknown"
            entry = Entry(ep.name, ep.value, group, dist)
            same = self._by_name.setdefault(ep.name, [])
            if entry not in same:
                same.append(entry)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def entries(self) -> list[list[Entry]]:
        """Every name's entries, sorted by name; more than one entry is a conflict."""
        return [self._by_name[name] for name in self.names()]

    def get(self, spec: str) -> Entry:
        """The entry ``spec`` names: ``NAME``, or ``DIST:NAME`` for the one of
        distribution ``DIST`` when several declare ``NAME``.  An unknown name, or a
        name several distributions declare without a choice, is a usage error."""
        dist, name = split_choice(spec)
        found = self._by_name.get(name)
        if not found:
            installed = ", ".join(self.names()) or "none"
            raise UsageError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self.names())}; installed {self.kind}s: {installed}"
            )
        if dist is not None:
            chosen = [e for e in found if _normalized(e.distribution) == _normalized(dist)]
            if not chosen:
                raise UsageError(f"no distribution '{dist}' declares {self.kind} '{name}'; "
                                 f"it is declared by {', '.join(repr(e.distribution) for e in found)}")
            return chosen[0]
        if len(found) > 1:
            raise UsageError(conflict_message(found))
        return found[0]


def conflict_message(entries: list[Entry]) -> str:
    both = " and ".join(f"'{e.distribution}' ({e.value})" for e in entries)
    first = entries[0]
    choose = f"{_CHOOSE[first.group]} {first.distribution}:{first.name}" if first.group in _CHOOSE else f"{first.distribution}:{first.name}"
    return f"{first.kind} name '{first.name}' is declared by {both}; choose one with {choose} (DIST:NAME), or uninstall one"
