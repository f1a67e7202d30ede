"""The ``trainer`` command.

Imports stay light at module level: ``trainer --help`` and ``trainer plugins``
never load torch.  Every error the user can fix is one line on stderr and a
non-zero exit status; ``--debug`` (or ``TRAINER_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import sys
from pathlib import Path
from typing import IO, Any, Callable, Iterator, TypeVar

import click
import pluggy

from trainer_core import __version__
from trainer_core.commands import add_commands
from trainer_core.entrypoints import DATASETS, FACTORY_ARGUMENTS, MODELS, PLUGINS, TASKS, Entry, Registry, conflict_message
from trainer_core.errorreport import closed_output_exits, debug_option, reports_errors
from trainer_core.errors import TrainerError, UsageError
from trainer_core.pluginmanager import check_plugin, implemented_hooks, make_plugin_manager
from trainer_core.sweepcli import add_sweep_command

F = TypeVar("F", bound=Callable[..., Any])

# ``run`` options that start torchrun; the processes it starts get the other options.
LAUNCHER_OPTIONS = ("nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint", "rdzv_timeout")

def worker_args(ctx: click.Context, skip: tuple[str, ...]) -> list[str]:
    """The command line that repeats this command's given options, less ``skip``
    (parameter names): what each process started by torchrun runs."""
    args = [ctx.info_name or ctx.command.name or ""]
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if param.name in skip or not isinstance(param, click.Option) or value in (None, False, ()):
            continue
        flag = max(param.opts, key=len)  # the long form
        if param.is_flag:
            args.append(flag)
        else:
            for item in value if param.multiple else (value,):
                args += [flag, str(item)]
    return args


def recipe_or_config(recipe: str | None, config_file: Path | None) -> Path | None:
    """The config file to read: ``--recipe``'s file, or ``--config`` (not both)."""
    if recipe is None:
        return config_file
    from trainer_core.errors import UsageError
    from trainer_core.recipes import find_recipe

    if config_file is not None:
        raise UsageError("give --config FILE or --recipe NAME, not both")
    return find_recipe(recipe)


class CommandLineError(click.ClickException):
    """A mistake click finds on the command line (an unknown command or option, a
    value not among the choices or not a number): one line, exit status 2."""

    exit_code = 2

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", err=file is None, file=file)


@contextlib.contextmanager
def one_line_usage_errors() -> Iterator[None]:
    """Turn click's usage errors (usage, a hint and the error, on four lines) into one line."""
    try:
        yield
    except getattr(click.exceptions, "NoArgsIsHelpError", ()):  # bare ``trainer``: the help, as click shows it
        raise
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        raise CommandLineError(exc.format_message() + hint) from None


class TrainerGroup(click.Group):
    """The ``trainer`` group: command-line mistakes are one line, like every other error,
    and output into a closed pipe (``trainer --help | head -1``) ends quietly."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        with closed_output_exits(), one_line_usage_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with closed_output_exits(), one_line_usage_errors():
            return super().invoke(ctx)


class _WarningLine(logging.Handler):
    """Warnings from the core and plugins as ``warning: ...`` lines on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"warning: {record.getMessage()}", err=True)


def show_warnings() -> None:
    logger = logging.getLogger("trainer_core")
    if not any(isinstance(h, _WarningLine) for h in logger.handlers):
        logger.addHandler(_WarningLine(logging.WARNING))
        logger.propagate = False


def list_entries(group: str, kind: str, describe: Callable[[Entry], list[str]]) -> None:
    """Print each entry of ``group`` and, indented, what ``describe`` says of it;
    an entry that fails to load, or a name two distributions declare, shows its
    error in its row instead, and the listing goes on."""
    registry = Registry(group)
    if not registry.names():
        click.echo(f"no {kind}s installed")
    for entries in registry.entries():
        entry = entries[0]
        click.echo(f"{entry.name}  ({entry.distribution})  {entry.value}")
        try:
            if len(entries) > 1:
                raise UsageError(conflict_message(entries))
            lines = describe(entry)
        except TrainerError as exc:
            lines = [f"error: {exc}"]
        for line in lines:
            click.echo(f"    {line}")


def summary_of(target: object) -> list[str]:
    """The first paragraph of ``target``'s docstring, on one line, up to its fields
    (``:param x:``...; none when it has no such text)."""
    first = (inspect.getdoc(target) or "").split("\n\n")[0].splitlines()
    prose = itertools.takewhile(lambda line: not line.startswith(":"), first)
    summary = " ".join(line.strip() for line in prose)
    return [summary] if summary else []


def make_cli(pm_factory: Callable[[], pluggy.PluginManager] = make_plugin_manager) -> click.Group:
    """Build the ``trainer`` command group; tests pass their own ``pm_factory``."""

    @click.group(cls=TrainerGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
    @click.version_option(__version__, prog_name="trainer")
    def cli() -> None:
        """Train PyTorch models with a small loop and pluggable extras.

        \b
        Start with:  trainer run                  (a small CNN on scikit-learn's digits)
        Then:        trainer plugins              (what you can turn on)
                     trainer run --plugins NAME   (turn it on; -o NAME.KEY=VALUE sets its options)
                     trainer tasks                (classification, regression, multi-label, language models)
        """
        show_warnings()

    @cli.command()
    @click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
                  help="TOML file with settings; command-line options override it.")
    @click.option("--recipe", metavar="NAME", help="A recipe from 'trainer recipes' (the same as --config with its file).")
    @click.option("--model", help="Model name from 'trainer models'.  [default: smallcnn]")
    @click.option("--dataset", help="Dataset name from 'trainer datasets'.  [default: digits]")
    @click.option("--data-root", help="Folder the dataset reads its files from.")
    @click.option("--task", help="Task name from 'trainer tasks' (-o task.KEY=VALUE sets its options).  [default: the dataset's]")
    @click.option("--plugins", "plugins", multiple=True, metavar="A,B",
                  help="Plugins to turn on, comma-separated; 'no:NAME' turns one off (e.g. no:progress).")
    @click.option("-o", "--option", "overrides", multiple=True, metavar="NAME.KEY=VALUE",
                  help="An option of a plugin, of 'model', 'dataset' or 'task', e.g. -o steplr.gamma=0.5. Repeatable.")
    @click.option("--epochs", type=int, help="Number of passes over the training split.  [default: 15]")
    @click.option("--batch-size", type=int, help="Samples per training step.  [default: 32]")
    @click.option("--lr", type=float, help="Learning rate.  [default: 0.001]")
    @click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]), help="Optimizer.  [default: adam]")
    @click.option("--momentum", type=float, help="SGD momentum.  [default: 0.9]")
    @click.option("--weight-decay", type=float, help="Weight decay.  [default: 0]")
    @click.option("--seed", type=int, help="Seed for initialisation and data order.  [default: 0]")
    @click.option("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.  [default: auto]")
    @click.option("--log-every", "log_every_n_steps", type=int, help="Steps between training-loss reports.  [default: 50]")
    @click.option("--precision", type=click.Choice(["32", "bf16", "16"]),
                  help="32-bit, or mixed precision with bf16 or fp16 (fp16 scales gradients).  [default: 32]")
    @click.option("--channels-last", is_flag=True, default=None, help="Channels-last memory format (faster convolutions on GPUs).")
    @click.option("--compile", is_flag=True, default=None, help="torch.compile the model (compile time is reported apart).")
    @click.option("--compile-mode", type=click.Choice(["default", "reduce-overhead", "max-autotune"]),
                  help="With --compile: torch.compile's mode; reduce-overhead replays CUDA graphs, "
                       "for small models whose GPU steps wait on kernel launches.  [default: default]")
    @click.option("--cuda-graph", is_flag=True, default=None,
                  help="Replay each training step (batch draw, forward, loss, backward, optimizer step) from CUDA graphs, "
                       "for small models whose GPU waits on the host; runs eager, saying why, where it cannot.")
    @click.option("--accumulate-grad-batches", type=int, help="Batches whose gradients add up before one optimizer step.  [default: 1]")
    @click.option("--clip-grad-norm", type=float, help="Clip the gradients' total norm to this value.")
    @click.option("--nonfinite", type=click.Choice(["stop", "skip"]),
                  help="On a NaN/inf loss: stop the run, or skip such steps (one host sync per step; "
                       "every process skips a step non-finite on any).  [default: stop]")
    @click.option("--num-workers", type=int, help="Loader processes for file-backed datasets.  [default: the cores torch's threads leave free (none on the CPU), at most 4]")
    @click.option("--nproc-per-node", type=int, metavar="N",
                  help="Train in N processes on this machine, started by torchrun: one per GPU, or CPU processes with gloo. "
                       "--batch-size stays the global batch.")
    @click.option("--nnodes", type=int, metavar="M", help="With --nproc-per-node: machines taking part.  [default: 1]")
    @click.option("--node-rank", type=int, metavar="R", help="With --nnodes: this machine's index, 0 to M-1 (or leave it to torchrun).")
    @click.option("--rdzv-endpoint", metavar="HOST:PORT", help="With --nnodes: where the machines meet (an address of node 0).")
    @click.option("--rdzv-timeout", type=int, metavar="SECONDS",
                  help="With --rdzv-endpoint: how long the machines may take to meet before the run fails.  [default: 600]")
    @click.option("--strategy", type=click.Choice(["auto", "ddp", "fsdp"]),
                  help="How several processes share the model: ddp keeps a copy on each, fsdp shards it "
                       "(FSDP2, for models larger than one device).  [default: auto, ddp]")
    @click.option("--backend", type=click.Choice(["gloo", "nccl"]),
                  help="torch.distributed backend of a multi-process run.  [default: nccl on CUDA, else gloo]")
    @click.option("--name", help="Run folder name under --runs-root.  [default: MODEL-DATASET-TIME]")
    @click.option("--runs-root", help="Folder that holds run folders.  [default: runs]")
    @click.option("--run-dir", help="Exact run folder (instead of --runs-root/--name).")
    @click.option("--resume", "resume_path", type=click.Path(path_type=Path),
                  help="Continue from a checkpoint file or a run folder (its newest checkpoint), in its run folder "
                       "(a checkpoint outside one: in a new run folder); 'auto': the newest checkpoint of the run named "
                       "by --name/--run-dir, or a fresh start there if it has none.")
    @click.option("--overwrite", is_flag=True, help="Reuse a run folder that already holds a run.")
    @click.option("-q", "--quiet", is_flag=True, help="No console output but warnings and errors: no progress (--plugins no:progress), no plugin notices.")
    @debug_option
    @reports_errors
    def run(config_file: Path | None, plugins: tuple[str, ...], overrides: tuple[str, ...], resume_path: Path | None,
            overwrite: bool, quiet: bool, **settings: Any) -> None:
        """Train a model and write a run folder (config.toml, metrics.jsonl, summary.json, checkpoints/).

        \b
        Examples:
          trainer run
          trainer run --plugins tensorboard,checkpoint --epochs 20
          trainer run --config recipes/cifar10-convnet.toml -o checkpoint.monitor=val/acc
        """
        from trainer_core import distributed
        from trainer_core.checkpointing import find_checkpoint, load_checkpoint
        from trainer_core.config import resolve_config
        from trainer_core.launcher import DEFAULT_RDZV_TIMEOUT_S, check_worker_options, launch, torchrun_args
        from trainer_core.resumecheck import check_resumable, check_same_optimizer, run_folder_of, same_folder
        from trainer_core.runner import build_run, run_path_for

        quieted = [o.partition("=")[0].strip() for o in overrides if quiet and o.strip().startswith("progress.")]
        if quieted:
            raise UsageError(f"option '{quieted[0]}' is for plugin 'progress', which -q turns off; leave out -q or the option")
        launcher = {key: settings.pop(key) for key in LAUNCHER_OPTIONS}
        backend = settings.pop("backend")
        if launcher["nproc_per_node"] is not None:
            ctx = click.get_current_context()
            rdzv_timeout = DEFAULT_RDZV_TIMEOUT_S if launcher["rdzv_timeout"] is None else launcher["rdzv_timeout"]
            torchrun = torchrun_args(
                launcher["nproc_per_node"], worker_args(ctx, LAUNCHER_OPTIONS), nnodes=launcher["nnodes"] or 1,
                node_rank=launcher["node_rank"], rdzv_endpoint=launcher["rdzv_endpoint"],
                rdzv_timeout=rdzv_timeout,
            )
            # Refuse what the processes would refuse before starting them: one clear error, not N racing ones.
            wanted = {key: value for key, value in settings.items() if key != "recipe"}
            from trainer_core.strategy import check_strategy

            resolved = resolve_config(recipe_or_config(settings["recipe"], config_file), wanted, plugins, overrides)
            distributed.check_config(resolved, size=launcher["nproc_per_node"] * (launcher["nnodes"] or 1))
            check_strategy(resolved, launching=True)
            launch(torchrun, rdzv_timeout=rdzv_timeout)
            return
        check_worker_options(launcher, backend)

        config_file = recipe_or_config(settings.pop("recipe"), config_file)
        resume, run_path, checkpoint, restart = None, None, None, False
        if resume_path is not None and str(resume_path) == "auto":
            # The named run's newest checkpoint, or a fresh start there when it has none yet
            # (also when its run stopped before its first save: RunDir.create says so).
            from trainer_core.checkpointing import CHECKPOINT_FOLDER, newest_checkpoint

            named = resolve_config(config_file, settings)
            if not (named.name or named.run_dir):
                raise UsageError("--resume auto needs --name or --run-dir to know which run to continue")
            resume_path = newest_checkpoint(run_path_for(named))
            if resume_path is None:
                saved = run_path_for(named) / CHECKPOINT_FOLDER
                if saved.is_dir() and any(p.name.endswith(".pt") and not p.name.startswith(".") for p in saved.iterdir()):
                    raise UsageError(f"--resume auto: no usable checkpoint in {saved}; resume from one with --resume FILE, "
                                     "or move them away to start the run afresh")
                restart = True
        if resume_path is not None:
            checkpoint = find_checkpoint(resume_path)
            resume = load_checkpoint(checkpoint)
            check_resumable(resume, checkpoint)  # before anything is written
            run_path = run_folder_of(checkpoint)  # None: not in a run folder; the resumed run writes a new one
        config = resolve_config(
            config_file, settings, [*plugins, *(["no:progress"] if quiet else [])], overrides,
            base=resume.get("config") if resume else None,
        )
        continues = None
        if resume is not None:
            assert checkpoint is not None
            check_same_optimizer(resume, config, checkpoint)
            own = run_path
            if settings.get("run_dir") or settings.get("name") or own is None:
                run_path = run_path_for(config)  # the user chose where the resumed run goes, or a new folder
            # It continues the run of the folder it writes only when that is the checkpoint's own run folder.
            continues = own is not None and same_folder(own, run_path)
        if distributed.launched_by_torchrun():
            from trainer_core.runtime import select_device

            if distributed.init_from_env(distributed.device_for_rank(select_device(config.device)), backend):
                click.get_current_context().call_on_close(distributed.shutdown)
        trainer = build_run(config, pm=pm_factory(), resume=resume, run_path=run_path, overwrite=overwrite, restart=restart,
                            continues=continues)
        trainer.quiet = quiet
        if checkpoint is not None and run_folder_of(checkpoint) is None and trainer.is_main:
            logging.getLogger("trainer_core").warning(
                "%s is not in a run folder: the resumed run is written to %s", checkpoint, trainer.run_path)
        state = trainer.fit()
        if not quiet and trainer.is_main:
            click.echo(f"run folder: {trainer.run_path}")
        if state.stop_reason and trainer.is_main:
            click.echo(f"stopped early: {state.stop_reason}")
        if trainer.signals.exit_code is not None:
            sys.exit(trainer.signals.exit_code)

    @cli.command()
    @debug_option
    @reports_errors
    def plugins() -> None:
        """List installed plugins: distribution, hooks and options.

        A plugin that fails to load shows its error in its row.
        """
        from trainer_core.options import options_of

        def describe(entry: Entry) -> list[str]:
            target = entry.load()
            check_plugin(pm_factory(), entry.name, target, entry.describe())
            options = options_of(target) if inspect.isclass(target) else []
            return [*summary_of(target), f"hooks: {', '.join(implemented_hooks(pm_factory(), target)) or 'none'}",
                    f"options: {'; '.join(o.describe() for o in options) or 'none'}"]

        list_entries(PLUGINS, "plugin", describe)

    def lister(group: str, kind: str) -> Callable[[], None]:
        @debug_option
        @reports_errors
        def show() -> None:
            from trainer_core.options import options_of

            def describe(entry: Entry) -> list[str]:
                factory = entry.load()
                options = options_of(factory, skip=FACTORY_ARGUMENTS[group])
                # A factory whose docstring is all fields is summed up by its module's.
                summary = summary_of(factory) or summary_of(inspect.getmodule(factory))
                return [*summary, f"options: {'; '.join(o.describe() for o in options) or 'none'}"]

            list_entries(group, kind, describe)

        show.__doc__ = f"""List installed {kind}s: distribution and options.

        A {kind} that fails to load shows its error in its row.
        """
        return show

    @cli.command()
    @debug_option
    @reports_errors
    def recipes() -> None:
        """List recipes (ready-made configs for 'trainer run --recipe NAME') and what each does."""
        from trainer_core.recipes import list_recipes, recipe_dirs

        found = list_recipes()
        if not found:
            click.echo(f"no recipes in {' or '.join(str(d) for d in recipe_dirs()) or './recipes'}")
        for recipe in found:
            click.echo(f"{recipe.name}  ({recipe.path})")
            if recipe.description:
                click.echo(f"    {recipe.description}")

    @cli.command()
    @debug_option
    @reports_errors
    def tasks() -> None:
        """List installed tasks: what each trains, its metrics and options.

        A dataset names its task; 'trainer run --task NAME' picks another.
        """
        from trainer_core.errors import PluginError
        from trainer_core.options import options_of
        from trainer_core.task import Task

        def describe(entry: Entry) -> list[str]:
            target = entry.load()
            if not (inspect.isclass(target) and issubclass(target, Task)):
                raise PluginError(f"{entry.value} is not a trainer_core.Task subclass")
            return [*summary_of(target), f"metrics: {', '.join(target.modes)} (headline: {target.headline})",
                    f"options: {'; '.join(o.describe() for o in options_of(target)) or 'none'}"]

        list_entries(TASKS, "task", describe)

    cli.command("models")(lister(MODELS, "model"))
    cli.command("datasets")(lister(DATASETS, "dataset"))
    add_commands(cli, pm_factory)
    add_sweep_command(cli, run, pm_factory)
    return cli


def main() -> None:
    """Console-script entry point."""
    make_cli()(prog_name="trainer")

