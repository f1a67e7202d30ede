"""The ``trainer sweep`` command: its own options, then every option of ``trainer run``
that says what a trial trains (the same parameters, so the two never drift apart).
The work is in :mod:`trainer_core.sweep`; like the other commands this module is
cheap to import."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import click
import pluggy

from trainer_core.errorreport import debug_option, reports_errors

# ``run`` options a sweep does not take: where a run writes and how it continues (the sweep
# chooses each trial's folder), console output (trials are quiet), launching several processes.
NOT_FOR_SWEEPS = ("name", "run_dir", "resume_path", "overwrite", "quiet", "debug", "nproc_per_node", "nnodes",
                  "node_rank", "rdzv_endpoint", "rdzv_timeout", "backend")


def add_sweep_command(cli: click.Group, run: click.Command, pm_factory: Callable[[], pluggy.PluginManager]) -> None:
    """Add ``sweep`` to the ``trainer`` group, taking ``run``'s options for what a trial trains."""

    @cli.command()
    @click.option("-s", "--space", "space", multiple=True, metavar="NAME=KIND:ARGS",
                  help="A searched setting: NAME is anything 'trainer run' takes (lr, batch_size, model.width, "
                       "steplr.gamma...), KIND:ARGS one of log:LOW:HIGH, float:LOW:HIGH, int:LOW:HIGH, choice:A,B,C. Repeatable.")
    @click.option("--trials", type=click.IntRange(min=1), default=20, show_default=True,
                  help="Trials to finish (completed or pruned), all processes and machines of the study together.")
    @click.option("--metric", help="The metric to optimise, e.g. val/loss.  [default: the task's headline, val/acc for classification]")
    @click.option("--mode", type=click.Choice(["auto", "min", "max"]), default="auto", show_default=True,
                  help="Whether lower or higher --metric is better; auto: what the task says of it.")
    @click.option("--pruner", type=click.Choice(["median", "halving", "none"]), default="median", show_default=True,
                  help="Stop hopeless trials at an evaluation: below the median of earlier trials at that epoch, "
                       "or by successive halving; none: every trial runs to its end.")
    @click.option("--startup-trials", type=click.IntRange(min=0), default=5, show_default=True,
                  help="Trials sampled at random, and never pruned by the median pruner, before earlier ones guide the search.")
    @click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
                  help="Processes on this machine running trials at once (each with its share of the cores).")
    @click.option("--storage", metavar="URL",
                  help="Optuna storage shared by every process and machine of the sweep, e.g. "
                       "postgresql://host/db.  [default: sqlite in the sweep folder]")
    @click.option("--study", metavar="NAME", help="The study's name in --storage.  [default: the sweep folder's name]")
    @click.option("--name", help="Sweep folder name under --runs-root; it holds a run folder per trial.  "
                                 "[default: sweep-MODEL-DATASET]")
    @click.option("--sampler-seed", type=int, help="Seed Optuna's sampler (process N of --jobs adds N) for a repeatable search.")
    @debug_option
    @reports_errors
    def sweep(space: tuple[str, ...], trials: int, metric: str | None, mode: str, pruner: str, startup_trials: int,
              jobs: int, storage: str | None, study: str | None, name: str | None, sampler_seed: int | None,
              config_file: Path | None, plugins: tuple[str, ...], overrides: tuple[str, ...], **settings: Any) -> None:
        """Search hyperparameters with Optuna; each trial is a run in the sweep folder.

        Run options (after the sweep's own) are the starting settings every trial shares;
        -s settings are searched.  The same command resumes an interrupted sweep.

        \b
        Examples:
          trainer sweep --trials 30 -s lr=log:1e-4:1e-1 -s batch_size=choice:32,64,128 -s model.width=int:16:128
          trainer sweep --trials 100 --jobs 4 -s lr=log:1e-4:1e-1 --epochs 5
          trainer sweep --study cnn --storage postgresql://db/optuna -s lr=log:1e-4:1e-1   (on each machine)
        """
        from trainer_core.cli import recipe_or_config
        from trainer_core.sweep import (STORAGE_FILE, SweepSpec, check_sweep, open_study, require_optuna, trials_table, work,
                                        write_best_config)
        from trainer_core.sweepjobs import fail_stale_trials, run_jobs

        require_optuna()
        config_file = recipe_or_config(settings.pop("recipe"), config_file)
        spec = SweepSpec(str(config_file) if config_file else None, settings, plugins, overrides, space, "", "", "",
                         trials, metric, mode, pruner, startup_trials, sampler_seed)
        spec.dimensions()  # a bad -s is refused first
        base = spec.trial_config({})
        folder = Path(base.runs_root) / (name or f"sweep-{base.model}-{base.dataset}")
        spec.folder, spec.study = str(folder), study or folder.name
        spec.storage = storage or f"sqlite:///{(folder / STORAGE_FILE).resolve()}"
        check_sweep(spec, pm_factory)
        if storage is None:  # (the SQLite file goes there; a storage elsewhere is opened before anything is made)
            folder.mkdir(parents=True, exist_ok=True)
        studied = open_study(spec)
        folder.mkdir(parents=True, exist_ok=True)
        for number in fail_stale_trials(studied):
            click.echo(f"trial {number} was left running by a process that is gone: marked failed, its values run again")
        click.echo(f"sweep folder: {folder}  (study '{spec.study}', {spec.resolved['mode']} {spec.resolved['metric']})")
        status = work(spec, pm_factory) if jobs == 1 else run_jobs(spec, jobs)
        click.echo(trials_table(studied, spec.resolved["metric"]))
        best = write_best_config(spec, studied)
        if best is not None:
            click.echo(f"best: trial {studied.best_trial.number}, {spec.resolved['metric']} {studied.best_value:.4g}; "
                       f"its settings: {best}")
        if status:
            sys.exit(status)

    sweep.params.extend(p for p in run.params if p.name not in NOT_FOR_SWEEPS)
