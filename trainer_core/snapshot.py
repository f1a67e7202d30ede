"""What a checkpoint holds: everything a run's future depends on, and how a
resumed run takes it back."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from trainer_core import __version__
from trainer_core.checkpointing import FORMAT, describe_misfit
from trainer_core.errors import UsageError
from trainer_core.pluginmanager import call_each
from trainer_core.runtime import rng_state, seed_everything, set_rng_state

if TYPE_CHECKING:
    from trainer_core.plugin_api import PluginAPI as Trainer


def capture(trainer: Trainer, rank_random_states: list[dict[str, object]] | None = None) -> dict[str, Any]:
    """The checkpoint payload of ``trainer`` now (see :meth:`Trainer.checkpoint_state`)."""
    return {
        "format": FORMAT,
        "trainer_core": __version__,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict() if trainer.optimizer is not None else None,
        "plugins": {name: s for name, s in call_each(trainer.pm, "plugin_state_dict", trainer=trainer).items() if s is not None},
        "state": trainer.state.state_dict(),
        "stepper": trainer.stepper.state_dict() if trainer.stepper is not None else None,
        **trainer.losses.state_dict(),
        "task": trainer.task.state_dict(),
        "rng": rng_state(),
        "rank_rng": rank_random_states,
        "config": trainer.config.to_toml(),
    }


def restore(trainer: Trainer, payload: Mapping[str, Any]) -> None:
    """Put ``payload`` back into ``trainer``: model, task, progress, plugins'
    state, optimizer, step options and random streams."""
    try:
        trainer.model.load_state_dict(payload["model"])
    except RuntimeError:
        raise UsageError(describe_misfit(trainer.model.state_dict(), payload["model"])) from None
    trainer.task.load_state_dict(payload.get("task") or {})
    state = trainer.state
    state.load_state_dict(payload["state"])
    state.should_stop, state.stop_reason = False, None
    trainer.losses.load_state_dict(payload)
    # Plugin state before the optimizer's: a plugin that added parameter groups
    # (freeze's unfreezing) rebuilds them so the saved optimizer state fits.
    saved = payload.get("plugins", {})
    for impl in trainer.pm.hook.load_plugin_state.get_hookimpls():
        if impl.plugin_name in saved:
            kwargs = {"trainer": trainer, "state": saved[impl.plugin_name]}
            impl.function(**{a: kwargs[a] for a in impl.argnames})
    if trainer.optimizer is not None and payload.get("optimizer") is not None:
        try:
            trainer.optimizer.load_state_dict(payload["optimizer"])
        except ValueError as exc:
            first = str(exc).strip().splitlines()[0]
            raise UsageError(f"checkpoint's optimizer state does not fit this run's parameters: {first}") from None
    if trainer.stepper is not None and payload.get("stepper"):
        trainer.stepper.load_state_dict(payload["stepper"])
    rank_states = payload.get("rank_rng")
    if rank_states is not None and len(rank_states) == trainer.world_size:
        set_rng_state(rank_states[trainer.rank])
    else:
        set_rng_state(payload["rng"])
        if trainer.rank > 0:  # saved by another number of processes (or by rank zero alone): fresh streams
            from trainer_core.distributed import rank_seed

            seed_everything(rank_seed(trainer.config.seed, trainer.rank) + state.step)
