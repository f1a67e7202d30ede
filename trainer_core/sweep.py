"""``trainer sweep``: a hyperparameter search on Optuna whose trials are ordinary runs.

Each trial resolves its settings as ``trainer run`` does (the run options, then
the trial's values from the search space: :mod:`trainer_core.sweepspace`), is
built by :func:`~trainer_core.runner.build_run` into its own run folder
(``SWEEP/trial-NNNN``) and trained by ``fit``.  A plugin registered for the trial
(:class:`TrialPruner`) reports every evaluation to Optuna and stops a hopeless
trial through the public ``request_stop``, with status ``pruned``.

The study lives in Optuna's storage (SQLite in the sweep folder by default), so
any number of processes, here (``--jobs``) or on other machines (``--storage``),
work on one study, and a sweep started again with the same command goes on where
it stopped: finished trials stay, a trial its process left behind (killed) is
marked failed and its values run again.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click
import pluggy

from trainer_core.config import RunConfig, resolve_config
from trainer_core.errors import TrainerError, UsageError
from trainer_core.pluginmanager import hookimpl, make_plugin_manager, register
from trainer_core.sweepjobs import this_process
from trainer_core.sweepspace import Dimension, as_run_options, parse_space

if TYPE_CHECKING:
    import optuna

    from trainer_core.plugin_api import PluginAPI

BEST_CONFIG = "best-config.toml"
STORAGE_FILE = "study.db"
# What the study records of the sweep, so that a resumed or joined sweep searches the same thing.
SWEEP_ATTR = "trainer_sweep"
# Settings that may differ between the machines of one sweep, left out of that record.
PER_MACHINE = ("data_root", "device", "num_workers", "runs_root", "run_dir", "name")
PRUNERS = ("median", "halving", "none")


def require_optuna() -> None:
    """Refuse in one line when the ``sweep`` extra is not installed."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UsageError("trainer sweep needs Optuna: pip install 'trainer-core[sweep]'") from None


@dataclass
class SweepSpec:
    """What every process of a sweep needs (plain data: ``--jobs`` hands it to each process).

    :ivar config_file: ``--config`` (or the recipe's file), if any.
    :ivar settings: the run options' top-level settings (``None``: not given).
    :ivar plugins: ``--plugins`` lists.
    :ivar overrides: ``-o`` options.
    :ivar space: the ``-s`` options, as written.
    :ivar folder: the sweep folder, which holds a run folder per trial.
    :ivar storage: Optuna's storage URL.
    :ivar study: the study's name.
    :ivar trials: trials to finish (completed or pruned), all processes together.
    :ivar metric: the objective (``None``: the task's headline metric).
    :ivar mode: ``auto`` (what the task says of the metric), ``min`` or ``max``.
    :ivar pruner: ``median``, ``halving`` or ``none``.
    :ivar startup_trials: trials that run before the sampler and the median pruner use earlier ones.
    :ivar sampler_seed: seed of the sampler (each ``--jobs`` process adds its index), or ``None``.
    """

    config_file: str | None
    settings: dict[str, Any]
    plugins: tuple[str, ...]
    overrides: tuple[str, ...]
    space: tuple[str, ...]
    folder: str
    storage: str
    study: str
    trials: int
    metric: str | None = None
    mode: str = "auto"
    pruner: str = "median"
    startup_trials: int = 5
    sampler_seed: int | None = None
    resolved: dict[str, str] = field(default_factory=dict)  # metric and mode, once known (check_sweep)

    def dimensions(self) -> list[Dimension]:
        return parse_space(self.space)

    def trial_config(self, params: dict[str, Any], *, quiet: bool = True) -> RunConfig:
        """The run settings of a trial with ``params``: the run options, then the trial's
        values; ``quiet`` turns progress output off (on again with ``--plugins progress``)."""
        settings, overrides = as_run_options(params)
        plugins = ["no:progress", *self.plugins] if quiet else list(self.plugins)
        return resolve_config(Path(self.config_file) if self.config_file else None, {**self.settings, **settings},
                              plugins, [*self.overrides, *overrides])


def check_sweep(spec: SweepSpec, pm_factory: Callable[[], pluggy.PluginManager]) -> None:
    """Refuse a sweep that cannot run before anything is written: a bad ``-s``, a
    setting no run takes, a value at the low end of the space a run refuses; and
    resolve the objective (the task's headline metric by default) into ``spec.resolved``."""
    from trainer_core.metrics import resolve_monitor
    from trainer_core.runner import build_run

    low = {d.name: d.choices[0] if d.kind == "choice" else (int(d.low) if d.kind == "int" else d.low)
           for d in spec.dimensions()}
    trainer = build_run(spec.trial_config(low), pm=pm_factory(), write_files=False)
    metric, mode = resolve_monitor(trainer, "--metric", spec.metric, spec.mode)  # type: ignore[arg-type]
    spec.resolved = {"metric": metric, "mode": mode}


def open_study(spec: SweepSpec, worker: int = 0) -> optuna.Study:
    """Create the study, or load it when it exists; refuse one that searches something else."""
    import optuna
    from optuna.storages import RDBStorage

    from trainer_core.runner import keep_typed_options

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own line per trial
    sqlite = spec.storage.startswith("sqlite")
    try:  # (SQLite: processes wait for each other's writes rather than fail at once)
        storage = RDBStorage(spec.storage, engine_kwargs={"connect_args": {"timeout": 60}} if sqlite else None)
    except Exception as exc:
        raise UsageError(f"--storage {spec.storage}: Optuna cannot open it ({' '.join(str(exc).split())[:200]})") from None
    startup = spec.startup_trials
    seed = None if spec.sampler_seed is None else spec.sampler_seed + worker
    pruner = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=startup),
              "halving": optuna.pruners.SuccessiveHalvingPruner, "none": optuna.pruners.NopPruner}[spec.pruner]()
    direction = "minimize" if spec.resolved["mode"] == "min" else "maximize"
    known = {summary.study_name for summary in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if spec.study not in known and any(Path(spec.folder).glob("trial-*")):  # (trial folders are numbered per study)
        raise UsageError(f"sweep folder {spec.folder} holds the trials of another study, and study '{spec.study}' is new: "
                         "a new study needs a sweep folder of its own; give another --name")
    study = optuna.create_study(storage=storage, study_name=spec.study, load_if_exists=True, pruner=pruner,
                                direction=direction,
                                sampler=optuna.samplers.TPESampler(n_startup_trials=startup, seed=seed))
    base = spec.trial_config({}, quiet=False)
    keep_typed_options(base)
    wanted = {"space": list(spec.space), **spec.resolved,
              "base": {k: v for k, v in base.to_toml().items() if k not in PER_MACHINE}}
    if study.direction.name.lower() != direction:  # (a study made by other means)
        raise UsageError(f"study '{spec.study}' in {spec.storage} is set to {study.direction.name.lower()} its objective, "
                         f"this sweep to {direction} {spec.resolved['metric']}; give --mode, or another --name for a new sweep")
    saved = study.user_attrs.get(SWEEP_ATTR)
    if saved is None:
        study.set_user_attr(SWEEP_ATTR, wanted)
    elif saved != wanted:
        raise UsageError(f"study '{spec.study}' in {spec.storage} is a sweep with other settings "
                         f"({_differences(saved, wanted)}); a sweep resumes with the command that started it, "
                         "or give another --name for a new sweep")
    return study


def _differences(saved: Any, wanted: dict[str, Any]) -> str:
    """What differs between the sweep a study records and this one, e.g. ``epochs: 2, here 3``."""
    def flat(value: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(value, dict):
            return {prefix: value}
        return {k: v for key, item in value.items() if key != "base"
                for k, v in flat(item, f"{prefix}.{key}" if prefix else key).items()}

    old = {**flat(saved.get("base", {}) if isinstance(saved, dict) else {}), **flat(saved)}
    new = {**flat(wanted["base"]), **flat(wanted)}
    keys = [k for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]
    return "; ".join(f"{k}: {old.get(k, 'unset')}, here {new.get(k, 'unset')}" for k in keys[:3])


# -- one trial ----------------------------------------------------------------

class TrialPruner:
    """Reports each evaluation's objective to the sweep's trial, and stops the run
    (status ``pruned``) when the pruner finds it hopeless.  Registered for a sweep's trials."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial, self.metric = trial, metric
        self.pruned = False

    @hookimpl
    def on_eval(self, trainer: PluginAPI, metrics: dict[str, float]) -> None:
        from trainer_core.metrics import check_monitor

        if trainer.state.restored is not None:  # the restored best weights' evaluation at the end: no epoch
            return
        check_monitor("--metric", self.metric, metrics)
        value, epoch = float(metrics[self.metric]), trainer.state.epoch
        if math.isfinite(value):
            self.trial.report(value, step=epoch)
        if self.trial.should_prune():
            self.pruned = True
            trainer.request_stop(f"pruned by the sweep at epoch {epoch} ({self.metric} {value:.4g})", status="pruned")


@dataclass
class Outcome:
    """How a trial ended: its state's name, its value, a word on why (an error, where it
    was pruned), and the exit status of a stop signal if one ended it."""

    state: str
    value: float | None = None
    note: str | None = None
    signal_exit: int | None = None


def best_value(history: list[dict[str, float]], metric: str, mode: str) -> float | None:
    """The best finite ``metric`` of a run's evaluations (the one its checkpoint plugin keeps)."""
    values = [float(m[metric]) for m in history if isinstance(m.get(metric), (int, float)) and math.isfinite(m[metric])]
    return (min if mode == "min" else max)(values) if values else None


def run_trial(spec: SweepSpec, study: optuna.Study, trial: optuna.Trial,
              pm_factory: Callable[[], pluggy.PluginManager]) -> Outcome:
    """Train one trial as a normal run in ``SWEEP/trial-NNNN`` and tell the study how it ended."""
    from optuna.trial import TrialState

    from trainer_core.runner import build_run

    metric, mode = spec.resolved["metric"], spec.resolved["mode"]
    path = Path(spec.folder) / f"trial-{trial.number:04d}"
    trial.set_user_attr("run", str(path))
    pm = pm_factory()
    pruner = TrialPruner(trial, metric)
    register(pm, "sweep-pruner", pruner, origin="trainer sweep")
    try:
        trainer = build_run(spec.trial_config(trial.params), pm=pm, run_path=path)
        trainer.quiet = True
        state = trainer.fit()
    except UsageError:
        study.tell(trial, state=TrialState.FAIL)
        raise  # a setting no run takes: every trial would fail alike
    except TrainerError as exc:  # e.g. a learning rate that makes the loss diverge: a bad trial, not a bad sweep
        study.tell(trial, state=TrialState.FAIL)
        return Outcome("failed", note=str(exc))
    except KeyboardInterrupt:
        _retry(study, trial)
        raise
    if trainer.signals.exit_code is not None:  # Ctrl-C or SIGTERM: the trial runs again when the sweep resumes
        _retry(study, trial)
        return Outcome("interrupted", signal_exit=trainer.signals.exit_code)
    if pruner.pruned and state.should_stop:
        study.tell(trial, state=TrialState.PRUNED)
        return Outcome("pruned", value=best_value(state.history, metric, mode), note=f"at epoch {state.epoch}")
    value = best_value(state.history, metric, mode)
    if value is None:
        study.tell(trial, state=TrialState.FAIL)
        return Outcome("failed", note=f"no finite {metric}")
    study.tell(trial, value)
    return Outcome("completed", value=value)


def _retry(study: optuna.Study, trial: optuna.Trial) -> None:
    from optuna.trial import TrialState

    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def _counts(study: optuna.Study) -> tuple[int, int]:
    """Trials finished (completed or pruned), and running."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    running = sum(t.state == TrialState.RUNNING for t in trials)
    return len(trials) - running, running


def describe_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def work(spec: SweepSpec, pm_factory: Callable[[], pluggy.PluginManager] = make_plugin_manager, worker: int = 0) -> int:
    """Run trials until the study has ``spec.trials`` finished ones (counting those other
    processes run); return the exit status: 0, or 128 + the signal that stopped it."""
    study = open_study(spec, worker)
    distributions = {d.name: d.distribution() for d in spec.dimensions()}
    failures = 0
    while sum(_counts(study)) < spec.trials:
        trial = study.ask(distributions)
        for key, value in this_process().items():
            trial.set_user_attr(key, value)
        started = time.monotonic()
        outcome = run_trial(spec, study, trial, pm_factory)
        took = f"{time.monotonic() - started:.0f}s"
        value = f": {spec.resolved['metric']} {outcome.value:.4g}" if outcome.value is not None else ""
        detail = f" ({outcome.note})" if outcome.note else ""
        click.echo(f"trial {trial.number} {outcome.state}{value}{detail} in {took}  [{describe_params(trial.params)}]")
        if outcome.signal_exit is not None:
            return outcome.signal_exit
        failures += outcome.state == "failed"
        if failures >= spec.trials:
            raise TrainerError(f"{failures} trials failed (last: {outcome.note}); see the trial folders in {spec.folder}")
    return 0


# -- the end: a table and the best settings -----------------------------------

def trials_table(study: optuna.Study, metric: str) -> str:
    """Every trial of the study: number, state, objective, values, run folder."""
    from trainer_core.runlist import format_table

    rows = []
    for t in study.get_trials(deepcopy=False):
        value = t.value if t.value is not None else (t.intermediate_values[t.last_step] if t.last_step is not None else None)
        retry = t.user_attrs.get("retry_of")
        rows.append([str(t.number), t.state.name.lower() + (f" (retry of {retry})" if retry is not None else ""),
                     f"{value:.4g}" if value is not None else "-", describe_params(t.params) or "-", str(t.user_attrs.get("run", "-"))])
    return format_table(["trial", "state", metric, "values", "run folder"], rows, [True, False, True, False, False])


def write_best_config(spec: SweepSpec, study: optuna.Study) -> Path | None:
    """The best completed trial's settings as a config file for ``trainer run --config``
    (``SWEEP/best-config.toml``); ``None`` when no trial has completed."""
    import tomli_w
    from optuna.trial import TrialState

    from trainer_core.files import atomic_write_bytes
    from trainer_core.runner import keep_typed_options

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    config = spec.trial_config(best.params, quiet=False)
    keep_typed_options(config)
    table = {k: v for k, v in config.to_toml().items() if k not in ("name", "run_dir")}
    header = (f"# The best of study '{spec.study}': trial {best.number}, {spec.resolved['metric']} {best.value:.6g}\n"
              f"# ({describe_params(best.params)}).  Train with it: trainer run --config THIS_FILE\n")
    path = Path(spec.folder) / BEST_CONFIG
    atomic_write_bytes(path, (header + tomli_w.dumps(table)).encode("utf-8"))
    return path
