"""What a checkpoint holds: everything a run's future depends on, and how a
resumed run takes it back."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from trainer_core import __version__
from trainer_core.checkpointing import FORMAT, checkpoint_weights, describe_misfit, load_checkpoint, save_checkpoint
from trainer_core.distributed import rank_seed
from trainer_core.errors import TrainerError, UsageError
from trainer_core.plugin_api import PluginAPI
from trainer_core.pluginmanager import call_each
from trainer_core.runtime import rng_state, seed_everything, set_rng_state
from trainer_core.sharded import check_layout, drop_stale_shards, link_shards

if TYPE_CHECKING:
    import torch


class Checkpoints(PluginAPI):
    """The part of a trainer that writes and reads checkpoints."""

    def rank_random_states(self) -> list[dict[str, object]]:
        """Every rank's random state, in rank order, for :meth:`checkpoint_state`.
        In a run of several processes every rank must call it (it gathers)."""
        return self.strategy.gather(rng_state())

    def checkpoint_state(self, rank_random_states: list[dict[str, object]] | None = None,
                         pending_loss: list[float] | None = None) -> dict[str, Any]:
        """Everything the run's future depends on, keyed for :meth:`load_checkpoint_state`.
        Under a strategy that shards the model its weights and optimizer state are not
        in it (``None``): :meth:`save_checkpoint` writes them as shards beside the file.

        :param rank_random_states: :meth:`rank_random_states`, so that every rank of a resumed
            run of as many processes continues its own random stream; without it, ranks
            other than zero start fresh streams on resume.
        :param pending_loss: the training loss of the current logging interval so far over every
            rank (gathered by :meth:`save_checkpoint` on every rank); without it, this rank's."""
        plugins = call_each(self.pm, "plugin_state_dict", trainer=self)
        whole = not self.strategy.shards_parameters
        from trainer_core.transfer import Normalization  # what inputs the weights expect, for a run that starts from them

        return {
            "format": FORMAT,
            "trainer_core": __version__,
            "normalization": Normalization.of(self.data).to_dict(),
            "model": self.model.state_dict() if whole else None,
            "optimizer": self.optimizer.state_dict() if whole and self.optimizer is not None else None,
            "plugins": {name: state for name, state in plugins.items() if state is not None},
            "state": self.state.state_dict(),
            "stepper": self.stepper.state_dict() if self.stepper is not None else None,
            **self.losses.state_dict(pending_loss),
            "task": self.task.state_dict(),
            "rng": rng_state(),
            "rank_rng": rank_random_states,
            "config": self.config.to_toml(),
        }

    def save_checkpoint(self, *paths: Path) -> None:
        """Write the checkpoint (:meth:`checkpoint_state`) to each of ``paths``, atomically:
        a failure leaves the previous file whole.  In a run of several processes every
        rank calls it (each writes its shards of a sharded model), rank zero writes the
        files, and all wait until they are complete."""
        if not paths:
            raise TypeError("save_checkpoint() needs at least one path")
        rank_states = self.rank_random_states() if self.distributed else None
        pending = self.losses.pending_over_ranks(self.strategy)
        shards = self.strategy.write_shards(self.model, self.optimizer, paths[0])
        token = shards["shards"] if shards is not None else None
        if self.is_main:
            payload = {**self.checkpoint_state(rank_states, pending), **(shards or {})}
            for path in paths:
                if token is not None and path != paths[0]:
                    link_shards(paths[0], token, path)
                save_checkpoint(path, payload)
                drop_stale_shards(path, keep=token)  # the shards the replaced file named
        self.barrier()

    def restore_weights(self, path: Path) -> None:
        """Load the model weights of checkpoint ``path`` (the checkpoint plugin's best) into
        the model.  In a run of several processes every rank calls it: rank zero reads
        the file and the others get its weights (under a sharding strategy each rank
        reads its shards, which must then be on a file system every rank sees)."""
        if self.strategy.shards_parameters:
            self.strategy.read_shards(self.model, None, load_checkpoint(path)["shards"])
            return
        if self.is_main:
            self.model.load_state_dict(checkpoint_weights(load_checkpoint(path), self.model))
        self.strategy.share_weights(self.model)

    def weights_finite(self) -> bool:
        """Whether every floating-point weight and buffer of the model is finite, on every
        rank: every rank must call it, and all get the same answer (so they act alike)."""
        import torch

        local = [self.strategy.local_tensor(t) for t in self.model.state_dict().values() if t.is_floating_point()]
        finite = torch.stack([torch.isfinite(t).all() for t in local]).all() if local else torch.tensor(True)
        return bool(self.all_reduce(finite.to(torch.int32).reshape(1).to(self.device), "min"))

    def model_weights(self) -> dict[str, torch.Tensor]:
        """The model's state dict as whole tensors (its own tensors where they are whole).
        Under ``--strategy fsdp`` they are gathered from every rank's shards: every rank
        must call it at the same point, and every rank gets them, in CPU memory (gathered one
        at a time: the whole model need not fit on one device)."""
        if not self.strategy.shards_parameters:
            return self.model.state_dict()
        return {name: self.strategy.full_tensor(tensor).cpu() for name, tensor in self.model.state_dict().items()}

    def load_model_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Load whole-tensor weights (what :meth:`model_weights` gives) into the model,
        whatever the strategy; in a run of several processes every rank calls it with the same weights."""
        self.strategy.load_whole_weights(self.model, weights)

    def full_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """The whole value of a parameter or its gradient.  Under a strategy that shards the
        model (``--strategy fsdp``) it is gathered from every rank's part, so every rank must
        call it at the same point; otherwise it is ``tensor`` itself, at no cost."""
        return self.strategy.full_tensor(tensor)

    def load_checkpoint_state(self, payload: Mapping[str, Any]) -> None:
        """Restore model, task, progress, plugins' state, optimizer, step options and
        random streams from a checkpoint, as a resume does."""
        check_layout(payload, self.strategy.shards_parameters)
        shards = payload.get("shards")
        if shards is not None:
            self.strategy.read_shards(self.model, None, shards)
        else:
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
        saved = payload.get("plugins") or {}
        for impl in self.pm.hook.load_plugin_state.get_hookimpls():
            if impl.plugin_name in saved:
                kwargs = {"trainer": self, "state": saved[impl.plugin_name]}
                try:
                    impl.function(**{a: kwargs[a] for a in impl.argnames})
                except TrainerError:
                    raise
                except Exception as exc:  # what the state holds is not what the plugin saves: a damaged file
                    first = (str(exc).strip().splitlines() or [""])[0]
                    reason = first if isinstance(exc, ValueError) and first else f"{type(exc).__name__}: {first}"
                    raise UsageError(f"the checkpoint's state of plugin '{impl.plugin_name}' cannot be taken back ({reason}); "
                                     "resume from another checkpoint, or start a new run from its weights with "
                                     "-o model.weights=CHECKPOINT") from exc
        if self.optimizer is not None and shards is not None:
            self.strategy.read_shards(self.model, self.optimizer, shards)
        elif self.optimizer is not None and payload.get("optimizer") is not None:
            try:
                self.optimizer.load_state_dict(payload["optimizer"])
            except ValueError as exc:
                first = str(exc).strip().splitlines()[0]
                raise UsageError(f"checkpoint's optimizer state does not fit this run's parameters: {first}") from None
            _check_state_shapes(self.optimizer)
            for group in self.optimizer.param_groups:  # where the state lives is this run's to say, not the file's
                if "capturable" in group:
                    group["capturable"] = self.optimizer.defaults.get("capturable", False)
        if self.stepper is not None and payload.get("stepper"):
            self.stepper.load_state_dict(payload["stepper"])
        rank_states = payload.get("rank_rng")
        if rank_states is not None and len(rank_states) == self.world_size:
            set_rng_state(rank_states[self.rank])
        else:
            set_rng_state(payload["rng"])
            if self.rank > 0:  # saved by another number of processes (or by rank zero alone): fresh streams
                seed_everything(rank_seed(self.config.seed, self.rank) + self.state.step)


def _check_state_shapes(optimizer: torch.optim.Optimizer) -> None:
    """torch loads each parameter's saved state (momentum, Adam's averages) as it is: one of
    another shape would fail the first step, mid-run.  Refuse it now, in one line."""
    import torch

    for index, (parameter, entries) in enumerate(optimizer.state.items()):
        for key, value in entries.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != parameter.shape:
                raise UsageError(f"checkpoint's optimizer state does not fit this run's parameters: its '{key}' of "
                                 f"parameter {index} has shape {tuple(value.shape)}, the parameter {tuple(parameter.shape)}")
