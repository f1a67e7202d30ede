"""Layer freezing for transfer learning: train the head, keep the backbone fixed,
optionally unfreeze it later at a lower learning rate."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trainer_core import UsageError, check_saved_state, did_you_mean, hookimpl, loaded_weights

if TYPE_CHECKING:
    from torch import nn

    from trainer_core import Trainer

class Freeze:
    """Freezes the model except its classifier head (or the modules you name).

    Frozen parameters get no gradients and are not given to the optimizer, so a
    frozen backbone costs no backward pass.  With ``unfreeze_at_epoch`` the
    backbone joins training at that epoch as a new parameter group whose
    learning rate is the current one times ``unfreeze_lr_factor``
    (Lightning's BackboneFinetuning, fastai's ``fine_tune``).
    """

    def __init__(
        self,
        train: list[str] | None = None,
        freeze: list[str] | None = None,
        unfreeze_at_epoch: int = 0,
        unfreeze_lr_factor: float = 0.1,
        freeze_bn: bool = True,
    ) -> None:
        """:param train: modules to keep trainable (by name, e.g. ``fc``); everything else is frozen.
            Default: the auto-detected head (``fc``, ``classifier``, ``head`` or the last ``Linear``).
        :param freeze: modules to freeze (e.g. ``layer1,layer2``); everything else trains.
        :param unfreeze_at_epoch: epoch at which the frozen modules start training (0: never).
        :param unfreeze_lr_factor: their learning rate relative to the current one.
        :param freeze_bn: keep batch-norm layers in frozen modules in eval mode (running statistics fixed)."""
        if train and freeze:
            raise ValueError("freeze.train and freeze.freeze exclude each other; name the modules to train or to freeze")
        if unfreeze_at_epoch < 0:
            raise ValueError(f"freeze.unfreeze_at_epoch must be >= 0, 0 for never (got {unfreeze_at_epoch})")
        if not unfreeze_lr_factor > 0:
            raise ValueError(f"freeze.unfreeze_lr_factor must be > 0 (got {unfreeze_lr_factor})")
        self.train = list(train or [])
        self.freeze = list(freeze or [])
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.unfreeze_lr_factor = unfreeze_lr_factor
        self.freeze_bn = freeze_bn
        self.unfrozen = False
        self.frozen_modules: list[str] = []  # what is frozen, in words, for the report
        self.frozen_params: list[nn.Parameter] = []  # in model.parameters() order: the unfrozen group's order
        self.frozen_bn: list[nn.Module] = []
        self.counts = (0, 0)  # (trainable, frozen) parameter elements at the start

    @hookimpl
    def on_setup(self, trainer: Trainer) -> None:
        model = trainer.model
        modules = dict(model.named_modules())
        del modules[""]
        named = self.freeze or self.train or [_find_head(model)]
        for name in named:
            if name not in modules:
                listing = ", ".join(n for n in modules if "." not in n)
                option = "freeze" if self.freeze else "train"
                raise UsageError(
                    f"freeze.{option}: the model has no module '{name}'{did_you_mean(name, modules)}; "
                    f"its top-level modules: {listing}"
                )

        def is_frozen(name: str) -> bool:  # a module's dotted name
            inside = any(_within(name, n) for n in named)
            return inside if self.freeze else not inside

        # By identity, not by name: a parameter two modules share (a language model's head tied
        # to its embedding) is listed once, under one name, yet belongs to both.
        named_ids = {id(p) for n in named for p in modules[n].parameters()}
        # Only what trains now is frozen (and later unfrozen), in model.parameters() order.
        self.frozen_params = [p for p in model.parameters() if p.requires_grad and (id(p) in named_ids) == bool(self.freeze)]
        _check_loaded(model, {id(p) for p in self.frozen_params})
        for param in self.frozen_params:
            param.requires_grad_(False)
        self.frozen_bn = [m for n, m in modules.items() if _is_batchnorm(m) and is_frozen(n)]
        self.frozen_modules = self.freeze or [f"everything but {', '.join(named)}"]
        frozen_count = sum(p.numel() for p in self.frozen_params)
        total = sum(p.numel() for p in model.parameters())
        self.counts = (total - frozen_count, frozen_count)
        share = 100 * frozen_count / total if total else 0.0
        trainer.echo(
            f"freeze: {total - frozen_count:,} trainable and {frozen_count:,} frozen parameters ({share:.1f}% frozen: "
            f"{', '.join(self.frozen_modules)})"
            + (f"; unfreezing at epoch {self.unfreeze_at_epoch}" if self.unfreeze_at_epoch else "")
        )

    @hookimpl
    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        if self.unfreeze_at_epoch and epoch >= self.unfreeze_at_epoch and not self.unfrozen:
            lr = self._unfreeze(trainer)
            trainer.echo(f"freeze: epoch {epoch}: training {', '.join(self.frozen_modules)} again, at lr {lr:g}")
        if self.freeze_bn and not self.unfrozen:
            # model.train() just switched every layer to training mode: put the frozen statistics back.
            for module in self.frozen_bn:
                module.eval()

    def _unfreeze(self, trainer: Trainer) -> float:
        """Make the frozen parameters trainable as a new optimizer group; return its learning rate."""
        optimizer = trainer.optimizer
        assert optimizer is not None
        lr = float(optimizer.param_groups[0]["lr"]) * self.unfreeze_lr_factor
        if self.frozen_params:
            for param in self.frozen_params:
                param.requires_grad_(True)
            optimizer.add_param_group({"params": self.frozen_params, "lr": lr})
        self.unfrozen = True
        return lr

    @hookimpl
    def plugin_state_dict(self) -> dict[str, Any]:
        return {"unfrozen": self.unfrozen}

    @hookimpl
    def load_plugin_state(self, trainer: Trainer, state: dict[str, Any]) -> None:
        # The core loads plugin state before the optimizer's, so the group added
        # here is in place when the saved optimizer state (two groups) is loaded.
        check_saved_state(state, unfrozen=bool)
        if state["unfrozen"] and not self.unfrozen:
            self._unfreeze(trainer)


def _within(name: str, ancestor: str) -> bool:
    """True when module ``name`` is ``ancestor`` or inside it."""
    return name == ancestor or name.startswith(ancestor + ".")


def _is_batchnorm(module: nn.Module) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    return isinstance(module, _BatchNorm)


def _check_loaded(model: nn.Module, frozen: set[int]) -> None:
    """Refuse to freeze parameters the starting weights did not provide: they would stay random for good."""
    record = loaded_weights(model)
    if record is None:
        return  # no starting weights: a random backbone is frozen on purpose (a baseline)
    fresh = [name for name, p in model.named_parameters() if id(p) in frozen and name in record.unloaded]
    if fresh:
        raise UsageError(f"freeze: {', '.join(fresh[:4])}{' ...' if len(fresh) > 4 else ''} were not loaded from "
                         f"{record.source} (random initialisation) and would be frozen; keep them trainable "
                         f"(-o freeze.train=...) or start from weights that have them")


def _find_head(model: nn.Module) -> str:
    """The head's module name: ``fc``, ``classifier``, ``head``, or the last ``Linear``."""
    from trainer_core_plugins.models.weights import find_head  # (imports torch: not when plugins are listed)

    name = find_head(model)
    if name is None:
        raise UsageError(
            "freeze: cannot find the model's head (no 'fc', 'classifier', 'head' or Linear layer); "
            "name the modules to train with -o freeze.train=NAME"
        )
    return name
