"""Discovery of plugins, models, datasets and tasks through entry points.

Listing reads package metadata only; nothing is imported until :meth:`Entry.load`.
"""

from __future__ import annotations

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

    def get(self, name: str) -> Entry:
        """The single entry called ``name``; unknown or ambiguous names are usage errors."""
        found = self._by_name.get(name)
        if not found:
            installed = ", ".join(self.names()) or "none"
            raise UsageError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self.names())}; installed {self.kind}s: {installed}"
            )
        if len(found) > 1:
            raise UsageError(conflict_message(found))
        return found[0]


def conflict_message(entries: list[Entry]) -> str:
    both = " and ".join(f"'{e.distribution}' ({e.value})" for e in entries)
    return f"{entries[0].kind} name '{entries[0].name}' is declared by {both}; uninstall one of them"
