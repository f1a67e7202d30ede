"""The search space of ``trainer sweep``: ``-s NAME=KIND:ARGS`` parsed into Optuna
distributions, and a trial's values turned back into ``trainer run``'s settings
and ``-o`` options.

``NAME`` is anything ``trainer run`` takes: a top-level setting (``lr``,
``batch_size``), ``model.KEY``, ``dataset.KEY``, ``task.KEY`` or a plugin's
``NAME.KEY``.  ``KIND`` is one of::

    log:LOW:HIGH        a float, log-uniform (learning rates, weight decay)
    float:LOW:HIGH      a float, uniform
    int:LOW:HIGH        an integer, uniform (both ends included)
    choice:A,B,C        one of the values (numbers stay numbers)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from trainer_core.errors import UsageError
from trainer_core.suggest import did_you_mean

KINDS = {"log": "log:LOW:HIGH", "float": "float:LOW:HIGH", "int": "int:LOW:HIGH", "choice": "choice:A,B,C"}
# Settings a sweep chooses itself: where each trial writes.
NOT_SEARCHABLE = ("name", "run_dir", "runs_root")


@dataclass(frozen=True)
class Dimension:
    """One ``-s`` option: the parameter's name (as written, ``batch_size`` or ``model.width``),
    its kind and its bounds or choices."""

    name: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()

    def distribution(self) -> Any:
        """The Optuna distribution that samples it."""
        import optuna.distributions as d

        if self.kind == "choice":
            return d.CategoricalDistribution(self.choices)
        if self.kind == "int":
            return d.IntDistribution(int(self.low), int(self.high))
        return d.FloatDistribution(self.low, self.high, log=self.kind == "log")


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def parse_dimension(spec: str) -> Dimension:
    """Read one ``-s NAME=KIND:ARGS``; a malformed one is a one-line :class:`UsageError`."""
    name, sep, rest = spec.partition("=")
    name = name.strip()
    kind, colon, args = rest.partition(":")
    example = "e.g. -s lr=log:1e-4:1e-1 or -s batch_size=choice:32,64,128"
    if not sep or not name or not colon:
        raise UsageError(f"search space '-s {spec}' is not of the form NAME=KIND:ARGS ({example})")
    if kind not in KINDS:
        raise UsageError(f"search space '-s {spec}': unknown kind '{kind}'{did_you_mean(kind, KINDS)}; "
                         f"kinds: {', '.join(KINDS.values())}")
    if name.replace("-", "_") in NOT_SEARCHABLE:
        raise UsageError(f"search space '-s {spec}': '{name}' is where each trial writes, which the sweep chooses")
    if kind == "choice":
        choices = tuple(_number(c.strip()) for c in args.split(","))
        if any(c == "" for c in choices) or len(set(choices)) != len(choices):
            raise UsageError(f"search space '-s {spec}': choices must be distinct and non-empty (e.g. choice:32,64,128)")
        return Dimension(name, kind, choices=choices)
    bounds = args.split(":")
    parsed = [_number(b) for b in bounds]
    if len(bounds) != 2 or any(isinstance(b, str) for b in parsed):
        raise UsageError(f"search space '-s {spec}': expected {KINDS[kind]} with two numbers")
    low, high = parsed
    if kind == "int" and not (isinstance(low, int) and isinstance(high, int)):
        raise UsageError(f"search space '-s {spec}': int bounds must be whole numbers")
    if not low < high:
        raise UsageError(f"search space '-s {spec}': LOW must be less than HIGH (got {low} and {high})")
    if kind == "log" and low <= 0:
        raise UsageError(f"search space '-s {spec}': a log range needs LOW > 0 (got {low})")
    return Dimension(name, kind, float(low), float(high))


def parse_space(specs: Iterable[str]) -> list[Dimension]:
    """Every ``-s`` option, in order; at least one, and no name twice."""
    space = [parse_dimension(spec) for spec in specs]
    if not space:
        raise UsageError("a sweep needs a search space: give -s NAME=KIND:ARGS, e.g. -s lr=log:1e-4:1e-1")
    names = [d.name for d in space]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise UsageError(f"search space: '{twice}' is given twice")
    return space


def as_run_options(params: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A trial's values as ``trainer run`` takes them: top-level settings (by field
    name) and ``-o OWNER.KEY=VALUE`` options, which the run checks and coerces as
    it does the command line's."""
    settings: dict[str, Any] = {}
    overrides: list[str] = []
    for name, value in params.items():
        if "." in name:
            overrides.append(f"{name}={value}")
        else:
            settings[name.replace("-", "_")] = value
    return settings, overrides
