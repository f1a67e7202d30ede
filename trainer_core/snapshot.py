"""What a checkpoint holds: everything a run's future depends on, and how a
resumed run takes it back."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from trainer_core import __version__
from trainer_core.checkpointing import FORMAT, describe_misfit, save_checkpoint
from trainer_core.distributed import rank_seed
from trainer_core.errors import UsageError
from trainer_core.plugin_api import PluginAPI
from trainer_core.pluginmanager import call_each
from trainer_core.runtime import rng_state, seed_everything, set_rng_state


class Checkpoints(PluginAPI):
    """The part of a trainer that writes and reads checkpoints."""

    def rank_random_states(self) -> list[dict[str, object]]:
        """Every rank's random state, in rank order, for :meth:`checkpoint_state`.
        In a run of several processes every rank must call it (it gathers)."""
        return self.strategy.gather(rng_state())

    def checkpoint_state(self, rank_random_states: list[dict[str, object]] | None = None) -> dict[str, Any]:
        """Everything the run's future depends on, keyed for :meth:`load_checkpoint_state`.

        :param rank_random_states: :meth:`rank_random_states`, so that every rank of a resumed
            run of as many processes continues its own random stream; without it, ranks
            other than zero start fresh streams on resume."""
        plugins = call_each(self.pm, "plugin_state_dict", trainer=self)
        return {
            "format": FORMAT,
            "trainer_core": __version__,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "plugins": {name: state for name, state in plugins.items() if state is not None},
            "state": self.state.state_dict(),
            "stepper": self.stepper.state_dict() if self.stepper is not None else None,
            **self.losses.state_dict(),
            "task": self.task.state_dict(),
            "rng": rng_state(),
            "rank_rng": rank_random_states,
            "config": self.config.to_toml(),
        }

    def save_checkpoint(self, path: Path) -> None:
        """Write :meth:`checkpoint_state` to ``path`` atomically.  In a run of several
        processes every rank calls it: rank zero writes, and all wait until it is complete."""
        rank_states = self.rank_random_states() if self.distributed else None
        if self.is_main:
            save_checkpoint(path, self.checkpoint_state(rank_states))
        self.barrier()

    def load_checkpoint_state(self, payload: Mapping[str, Any]) -> None:
        """Restore model, task, progress, plugins' state, optimizer, step options and
        random streams from a checkpoint, as a resume does."""
        try:
            self.model.load_state_dict(payload["model"])
        except RuntimeError:
            raise UsageError(describe_misfit(self.model.state_dict(), payload["model"])) from None
        self.task.load_state_dict(payload.get("task") or {})
        self.state.load_state_dict(payload["state"])
        self.state.should_stop, self.state.stop_reason = False, None
        self.losses.load_state_dict(payload)
        # Plugin state before the optimizer's: a plugin that added parameter groups
        # (freeze's unfreezing) rebuilds them so the saved optimizer state fits.
        saved = payload.get("plugins", {})
        for impl in self.pm.hook.load_plugin_state.get_hookimpls():
            if impl.plugin_name in saved:
                kwargs = {"trainer": self, "state": saved[impl.plugin_name]}
                impl.function(**{a: kwargs[a] for a in impl.argnames})
        if self.optimizer is not None and payload.get("optimizer") is not None:
            try:
                self.optimizer.load_state_dict(payload["optimizer"])
            except ValueError as exc:
                first = str(exc).strip().splitlines()[0]
                raise UsageError(f"checkpoint's optimizer state does not fit this run's parameters: {first}") from None
        if self.stepper is not None and payload.get("stepper"):
            self.stepper.load_state_dict(payload["stepper"])
        rank_states = payload.get("rank_rng")
        if rank_states is not None and len(rank_states) == self.world_size:
            set_rng_state(rank_states[self.rank])
        else:
            set_rng_state(payload["rng"])
            if self.rank > 0:  # saved by another number of processes (or by rank zero alone): fresh streams
                seed_everything(rank_seed(self.config.seed, self.rank) + self.state.step)
