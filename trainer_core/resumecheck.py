"""What a resume reads, checked before the run folder changes: where a checkpoint's
run folder is, and whether a checkpoint holds what a resumed run takes back.

A checkpoint refused here is one line naming the file and the part that is wrong;
nothing has been written yet.  (``metrics.jsonl`` is checked when the folder is
reopened: :func:`trainer_core.rundir.read_metrics`.)
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from trainer_core.errors import UsageError
from trainer_core.rundir import CHECKPOINTS, CONFIG

if TYPE_CHECKING:
    from trainer_core.config import RunConfig


def run_folder_of(checkpoint: Path) -> Path | None:
    """The run folder ``checkpoint`` belongs to: ``RUN`` for ``RUN/checkpoints/FILE``
    when ``RUN`` holds a run's ``config.toml``; ``None`` for a checkpoint anywhere
    else (a folder a checkpoint was copied to is not a run folder)."""
    folder = checkpoint.parent
    if folder.name == CHECKPOINTS and (folder.parent / CONFIG).is_file():
        return folder.parent
    return None


def same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


class _Refused(Exception):
    """A part of a checkpoint that a resume cannot take back, and why."""


def check_resumable(payload: Mapping[str, Any], source: Path) -> None:
    """Refuse a checkpoint a resume cannot take back: a missing part, or one of the
    wrong kind (what ``load_checkpoint_state`` and the plugins' restore read)."""
    try:
        _check_payload(payload)
    except _Refused as exc:
        raise UsageError(f"checkpoint {source} cannot be resumed: {exc}") from None


def check_same_optimizer(payload: Mapping[str, Any], config: RunConfig, source: Path) -> None:
    """A resume continues the optimizer and its state, whose settings (and any schedule's
    changes to them) are the saved ones: another optimizer, or other settings, are refused."""
    from trainer_core.config import RunConfig

    saved = payload.get("config") or {}
    defaults = RunConfig()
    old = saved.get("optimizer", defaults.optimizer)
    fresh = f"or start a new run from its weights with -o model.weights={source}"
    if config.optimizer != old:
        raise UsageError(f"cannot resume {source} with optimizer {config.optimizer}: its run trains with {old}, and a resume "
                         f"continues that optimizer and its state; leave --optimizer out, {fresh}")
    for name in ("lr", "weight_decay", *(["momentum"] if old == "sgd" else [])):
        was = saved.get(name, getattr(defaults, name))
        if getattr(config, name) != was:
            option = "--" + name.replace("_", "-")
            raise UsageError(f"cannot resume {source} with {option} {getattr(config, name)}: its run trains with {was}, and a "
                             f"resume continues the saved optimizer settings; leave {option} out, {fresh}")


def check_saved_state(state: Any, **kinds: Any) -> None:
    """Check a plugin's saved state before its ``load_plugin_state`` uses it: a
    checkpoint may be damaged, and a value of the wrong kind taken in now (a
    scheduler's position as text) fails later, mid-run.  ``state`` must be a table
    holding each keyword's key with a value of its kind: a type, ``None``, a tuple
    of those, or ``[type]`` for a list of that type.  ``int`` takes no ``bool``;
    ``float`` takes ``int`` too (and no NaN or infinity).

    Raises ``ValueError`` naming the first key that is missing or of another kind;
    the resume then stops in one line naming the plugin (exit status 2)::

        check_saved_state(state, monitor=str, best=(float, None), wait=int, lrs=[float])
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"it is {_kind(state)}, not a table")
    for key, kind in kinds.items():
        if key not in state:
            raise ValueError(f"it has no '{key}'")
        value = state[key]
        if isinstance(kind, list):
            fits = isinstance(value, list) and all(_is_kind(item, kind[0]) for item in value)
        else:
            fits = any(_is_kind(value, k) for k in (kind if isinstance(kind, tuple) else (kind,)))
        if not fits:
            raise ValueError(f"its '{key}' is {_kind(value)}, not {_kind_name(kind)}")


def _is_kind(value: Any, kind: Any) -> bool:
    if kind is None:
        return value is None
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return _number(value)
    return isinstance(value, kind)


def _kind_name(kind: Any) -> str:
    if isinstance(kind, list):
        return f"a list of {_kind_name(kind[0])}"
    if isinstance(kind, tuple):
        return " or ".join(_kind_name(k) for k in kind)
    words = {None: "none", int: "a whole number", float: "a number", str: "text", bool: "true or false", dict: "a table",
             list: "a list"}
    return words.get(kind, getattr(kind, "__name__", str(kind)))


def _check_payload(payload: Mapping[str, Any]) -> None:
    import torch

    from trainer_core.state import TrainState

    def part(key: str, kind: type | tuple[type, ...], required: bool = True) -> Any:
        if key not in payload:
            if required:
                raise _Refused(f"it has no '{key}'")
            return None
        value = payload[key]
        if not isinstance(value, kind) and not (value is None and not required):
            raise _Refused(f"its '{key}' is {_kind(value)}, not {_names(kind)}")
        return value

    part("config", Mapping, required=False)
    if payload.get("shards") is None:
        part("model", Mapping)  # (its entries are checked by load_checkpoint)
    optimizer = part("optimizer", Mapping, required=False)
    if optimizer is not None:
        groups = optimizer.get("param_groups")
        state = optimizer.get("state")
        if not isinstance(state, Mapping) or not all(isinstance(s, Mapping) for s in state.values()) or not isinstance(
                groups, list) or not all(isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in groups):
            raise _Refused("its 'optimizer' is not an optimizer's state (state and param_groups)")
        _check_optimizer(groups, state, (payload.get("config") or {}).get("optimizer"))
    plugins = part("plugins", Mapping, required=False)
    if plugins is not None and not all(isinstance(name, str) for name in plugins):
        raise _Refused("its 'plugins' is not keyed by plugin names")
    part("task", Mapping, required=False)
    stepper = part("stepper", Mapping, required=False)
    if stepper is not None and not _whole(stepper.get("skipped", 0)):
        raise _Refused(f"its 'stepper.skipped' is {_kind(stepper.get('skipped'))}, not a whole number")
    for key in ("epoch_totals", "pending"):
        pair = part(key, (list, tuple))
        if len(pair) != 2 or not _number(pair[0]) or not _whole(pair[1]):
            raise _Refused(f"its '{key}' is not a loss sum and a sample count")

    state = part("state", Mapping)
    defaults = TrainState().state_dict()
    unknown = sorted(str(k) for k in state if k not in defaults)
    if unknown:
        raise _Refused(f"its 'state' holds {', '.join(unknown)}, which a run's progress has not")
    for key in ("epoch", "step", "batch_idx"):
        if key not in state:
            raise _Refused(f"its 'state' has no '{key}'")
    for key, value in state.items():
        default = defaults[key]
        ok = (_whole(value) if isinstance(default, int) else _number(value) and value >= 0 if isinstance(default, float)
              else isinstance(value, Mapping) if isinstance(default, dict)
              else isinstance(value, list) and all(isinstance(m, Mapping) for m in value))
        if not ok:
            want = ("a whole number >= 0" if isinstance(default, int) else "a number >= 0" if isinstance(default, float)
                    else "a table" if isinstance(default, dict) else "a list of tables")
            raise _Refused(f"its 'state.{key}' is {_kind(value)}, not {want}")
    # Evaluations, as the loop records them (summary.json's best and final are read from them).
    evaluations = [("state.metrics", state["metrics"])] if state.get("metrics") else []
    evaluations += [(f"state.history[{i}]", m) for i, m in enumerate(state.get("history", []))]
    for where, metrics in evaluations:
        if not (_whole(metrics.get("epoch")) and _whole(metrics.get("step")) and all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in metrics.items())):
            raise _Refused(f"its '{where}' is not an evaluation (named numbers with a whole epoch and step)")

    _check_random_state(part("rng", Mapping), "rng")
    rank_states = part("rank_rng", list, required=False)
    for i, rank_state in enumerate(rank_states or []):
        _check_random_state(rank_state, f"rank_rng[{i}]")


def _check_optimizer(groups: list[Mapping[str, Any]], state: Mapping[Any, Mapping[str, Any]], name: object) -> None:
    """Each parameter group holds the settings its optimizer's groups hold (numbers where they
    are numbers, switches where they are switches), and each parameter's state what one step
    of that optimizer with its group's switches leaves (Adam's ``amsgrad`` keeps one more
    average): torch's ``load_state_dict`` takes both unchecked, and the first step would trip
    over a missing one."""
    import torch

    from trainer_core.config import RunConfig
    from trainer_core.stepping import OPTIMIZERS

    config = RunConfig()
    factory = OPTIMIZERS.get(name if isinstance(name, str) else config.optimizer)
    if factory is None:
        return  # (another optimizer is refused by check_same_optimizer, naming it)
    group_reference = factory([torch.zeros(1, requires_grad=True)], config).param_groups[0]
    for index, group in enumerate(groups):
        for key, value in group_reference.items():
            if key == "params":
                continue
            if key not in group:
                raise _Refused(f"its optimizer's parameter group {index} has no '{key}'")
            if _number(value) and not (_number(group[key]) or isinstance(group[key], torch.Tensor)):
                raise _Refused(f"its optimizer's '{key}' in parameter group {index} is {_kind(group[key])}, not a number")
            if isinstance(value, bool) and not isinstance(group[key], bool):
                raise _Refused(f"its optimizer's '{key}' in parameter group {index} is {_kind(group[key])}, not true or false")
        # (capturable is where the state lives, a GPU's: it changes no entry, and the CPU cannot step with it)
        switches = {k: group[k] for k, v in group_reference.items() if isinstance(v, bool) and k != "capturable"}
        reference = _one_step_state(factory, config, switches)
        for parameter in group["params"]:
            entries = state.get(parameter) if isinstance(parameter, int) else None
            for key, value in reference.items() if entries is not None else ():
                if key not in entries:
                    raise _Refused(f"its optimizer's state of parameter {parameter!r} has no '{key}'")
                if isinstance(value, torch.Tensor) and not isinstance(entries[key], torch.Tensor):
                    raise _Refused(f"its optimizer's '{key}' of parameter {parameter!r} is {_kind(entries[key])}, not a tensor")
                if isinstance(value, torch.Tensor) and value.dim() == 0 and entries[key].dim() != 0:
                    raise _Refused(f"its optimizer's '{key}' of parameter {parameter!r} is a tensor of shape "
                                   f"{tuple(entries[key].shape)}, not one number")


def _one_step_state(factory: Any, config: RunConfig, switches: Mapping[str, bool]) -> dict[str, Any]:
    """What one step of the optimizer, with these switches, leaves for a parameter."""
    import torch

    parameter = torch.zeros(1, requires_grad=True)
    optimizer = factory([parameter], config)
    optimizer.param_groups[0].update(switches)
    parameter.grad = torch.ones(1)
    try:
        optimizer.step()
    except (RuntimeError, ValueError, TypeError) as exc:  # (switches no run sets together)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _Refused(f"its optimizer's settings cannot make a step: {first[:200]}") from None
    return dict(optimizer.state[parameter])


def _check_random_state(state: Any, where: str) -> None:
    """Load the saved random streams into scratch generators: what fails there would fail the resume."""
    import numpy as np
    import torch

    if not isinstance(state, Mapping):
        raise _Refused(f"its '{where}' is {_kind(state)}, not random states")
    try:
        python, numpy = state["python"], state["numpy"]
        random.Random().setstate((python[0], tuple(python[1]), python[2]))
        np.random.RandomState().set_state(("MT19937", numpy["keys"].numpy(), numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
        torch.Generator().set_state(state["torch"])
        cuda = state.get("cuda")
        if cuda is not None and not (isinstance(cuda, list) and all(isinstance(t, torch.Tensor) for t in cuda)):
            raise TypeError("cuda is not a list of tensors")
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _Refused(f"its '{where}' is not the random states a run saves ({first[:200]})") from None


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _kind(value: Any) -> str:
    return "missing" if value is None else type(value).__name__


def _names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    words = {"Mapping": "a table", "list": "a list", "tuple": "a list"}
    return " or ".join(dict.fromkeys(words.get(k.__name__, k.__name__) for k in kinds))
