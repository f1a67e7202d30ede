"""Recipes: ready-made TOML configs, run with ``trainer run --recipe NAME``.

They are looked for in ``./recipes`` first (a project's own), then in the
``recipes/`` folder of the source tree next to the package (the built-in ones
that reproduce the seed programs).  A recipe's description is the comment at
the top of its file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer_core.errors import UsageError
from trainer_core.suggest import did_you_mean

SUFFIX = ".toml"


@dataclass(frozen=True)
class Recipe:
    """One recipe file."""

    name: str
    path: Path

    @property
    def description(self) -> str:
        """The leading ``#`` comment lines, joined; empty when there are none."""
        lines = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            stripped = line.strip()
            if not stripped.startswith("#"):
                break
            lines.append(stripped.lstrip("#").strip())
        return " ".join(part for part in lines if part)


def recipe_dirs() -> list[Path]:
    """Folders searched for recipes, in order: ``./recipes``, then the source tree's."""
    folders = [Path.cwd() / "recipes", Path(__file__).resolve().parent.parent / "recipes"]
    unique: list[Path] = []
    for folder in folders:
        if folder.is_dir() and all(folder.resolve() != seen.resolve() for seen in unique):
            unique.append(folder)
    return unique


def list_recipes() -> list[Recipe]:
    """Every recipe by name; a name in an earlier folder hides the same name in a later one."""
    found: dict[str, Recipe] = {}
    for folder in recipe_dirs():
        for path in sorted(folder.glob(f"*{SUFFIX}")):
            found.setdefault(path.stem, Recipe(path.stem, path))
    return sorted(found.values(), key=lambda r: r.name)


def find_recipe(name: str) -> Path:
    """The file of recipe ``name`` (``.toml`` optional); an unknown name is a usage error listing the known ones."""
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    recipes = {r.name: r for r in list_recipes()}
    if stem in recipes:
        return recipes[stem].path
    where = " and ".join(str(d) for d in recipe_dirs()) or "./recipes (no such folder)"
    known = ", ".join(recipes) or "none"
    raise UsageError(f"unknown recipe '{name}'{did_you_mean(stem, recipes)}; recipes in {where}: {known}")
