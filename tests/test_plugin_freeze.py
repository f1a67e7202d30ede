"""The freeze plugin: what it freezes, that frozen layers cost no gradients and
do not move, batch-norm statistics, and unfreezing at an epoch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer_core_plugins.freeze import Freeze
from trainer_core import UsageError
from trainer_core.testing import run_tiny, tiny_data


class Net(nn.Module):
    """A backbone with batch norm and a head called ``fc``, like torchvision's ResNet."""

    def __init__(self, head: str = "fc") -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.extra = nn.Linear(16, 16)
        setattr(self, head, nn.Linear(16, 3))
        self.head_name = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.head_name)(torch.relu(self.extra(self.body(x))))


def setup(plugin: Freeze, model: nn.Module | None = None):
    """Call on_setup on a real, unstarted trainer."""
    trainer = run_tiny(fit=False, model=model)
    plugin.on_setup(trainer=trainer)
    return trainer


def trainable(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("head", ["fc", "classifier"])
def test_head_found_by_name(head: str) -> None:
    trainer = setup(Freeze(), Net(head))
    assert trainable(trainer.model) == [f"{head}.weight", f"{head}.bias"]


def test_head_is_the_last_linear_otherwise() -> None:
    trainer = setup(Freeze())  # the kit's Sequential: Flatten, Linear, ReLU, Linear
    assert trainable(trainer.model) == ["3.weight", "3.bias"]


def test_counts_are_reported(capsys: pytest.CaptureFixture[str]) -> None:
    plugin = Freeze()
    setup(plugin, Net())
    assert plugin.counts == (16 * 3 + 3, (16 * 16 + 16) * 2 + 2 * 16)
    assert "freeze: 51 trainable and 576 frozen parameters (91.9% frozen: everything but fc)" in capsys.readouterr().out


def test_named_modules_to_train_or_to_freeze() -> None:
    assert trainable(setup(Freeze(train=["extra", "fc"]), Net()).model) == ["extra.weight", "extra.bias", "fc.weight", "fc.bias"]
    assert trainable(setup(Freeze(freeze=["body"]), Net()).model) == ["extra.weight", "extra.bias", "fc.weight", "fc.bias"]
    # A nested name works too.
    assert "body.1.weight" not in trainable(setup(Freeze(freeze=["body.1"]), Net()).model)


def test_unknown_module_is_a_usage_error_with_a_suggestion() -> None:
    with pytest.raises(UsageError, match=r"freeze.train: the model has no module 'fcc' \(did you mean 'fc'\?\); "
                                         r"its top-level modules: body, extra, fc"):
        setup(Freeze(train=["fcc"]), Net())


def test_model_without_a_head_needs_names() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 4), nn.Flatten())
    with pytest.raises(UsageError, match="cannot find the model.s head.*-o freeze.train=NAME"):
        setup(Freeze(), model)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"train": ["fc"], "freeze": ["body"]}, "exclude each other"), ({"unfreeze_at_epoch": -1}, "must be >= 0"),
     ({"unfreeze_lr_factor": 0.0}, "unfreeze_lr_factor must be > 0")],
)
def test_bad_options_are_rejected(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Freeze(**options)


def test_frozen_layers_get_no_gradients_and_do_not_move(tmp_path) -> None:
    torch.manual_seed(0)
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = run_tiny({"freeze": Freeze()}, model=model, epochs=2, run_dir=tmp_path / "run")
    given = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        if name.startswith("fc."):
            assert param.grad is None or param.grad.abs().sum() > 0  # the optimizer zeroes to None after a step
            assert not torch.equal(param, before[name]), name
            assert id(param) in given
        else:
            assert param.grad is None, name  # autograd never computed it
            assert torch.equal(param, before[name]), name
            assert id(param) not in given, name
    # freeze_bn: the frozen batch norm kept its running statistics.
    assert torch.equal(model.body[2].running_mean, before["body.2.running_mean"])
    assert model.body[2].num_batches_tracked == 0


def test_frozen_backbone_has_no_backward_pass() -> None:
    """A backward hook on the frozen layer never fires: its gradients are not computed at all."""
    model = Net()
    fired = []
    model.extra.register_full_backward_hook(lambda *args: fired.append(1))
    trainer = run_tiny({"freeze": Freeze()}, model=model, epochs=1)
    assert trainer.state.step == 3 and fired == []
    plain = Net()  # without the plugin the same hook fires at every step
    plain.extra.register_full_backward_hook(lambda *args: fired.append(1))
    run_tiny(model=plain, epochs=1)
    assert len(fired) == 3


def test_freeze_bn_false_lets_statistics_update() -> None:
    model = Net()
    run_tiny({"freeze": Freeze(freeze_bn=False)}, model=model, epochs=1)
    assert model.body[2].num_batches_tracked == 3


def test_unfreeze_at_epoch_adds_a_param_group_at_a_lower_lr(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = Net()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    snapshots: list[dict[str, torch.Tensor]] = []

    class Snapshot:
        from trainer_core import hookimpl

        @hookimpl
        def on_epoch_end(self) -> None:
            snapshots.append({k: v.clone() for k, v in model.state_dict().items()})

    plugin = Freeze(unfreeze_at_epoch=2, unfreeze_lr_factor=0.5)
    trainer = run_tiny({"freeze": plugin, "snap": Snapshot()}, model=model, epochs=3, lr=0.05, run_dir=tmp_path / "run")
    assert torch.equal(snapshots[0]["extra.weight"], start["extra.weight"])  # frozen in epoch 1
    assert not torch.equal(snapshots[1]["extra.weight"], snapshots[0]["extra.weight"])  # trains from epoch 2
    assert not torch.equal(snapshots[1]["body.2.running_mean"], start["body.2.running_mean"])  # batch norm too
    groups = trainer.optimizer.param_groups
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(0.025)
    assert [id(p) for p in groups[1]["params"]] == [id(p) for n, p in model.named_parameters() if not n.startswith("fc.")]
    assert all(p.requires_grad for p in model.parameters()) and plugin.plugin_state_dict() == {"unfrozen": True}
    assert "freeze: epoch 2: training everything but fc again, at lr 0.025" in capsys.readouterr().out


def test_load_state_after_unfreezing_rebuilds_the_group() -> None:
    plugin = Freeze(unfreeze_at_epoch=5)
    trainer = run_tiny({"freeze": plugin}, model=Net(), epochs=1)
    assert len(trainer.optimizer.param_groups) == 1
    plugin.load_plugin_state(trainer=trainer, state={"unfrozen": True})
    assert len(trainer.optimizer.param_groups) == 2 and plugin.unfrozen
    plugin.load_plugin_state(trainer=trainer, state={"unfrozen": True})  # idempotent
    assert len(trainer.optimizer.param_groups) == 2


def test_works_on_a_model_from_the_registry() -> None:
    """The built-in smallcnn: its head is found and training still learns."""
    from trainer_core_plugins.models.smallcnn import build

    data = tiny_data(shape=(1, 8, 8))
    model = build(input_shape=(1, 8, 8), num_classes=3)
    plugin = Freeze()
    trainer = run_tiny({"freeze": plugin}, model=model, data=data, epochs=3)
    trainable_count, frozen_count = plugin.counts
    assert trainable_count > 0 and frozen_count > 0
    assert sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"]) == trainable_count
    assert trainer.state.metrics["val/acc"] > 0.5


def test_a_head_tied_to_the_embedding_keeps_training_with_it() -> None:
    # tiny-gpt's head shares its weight with the token embedding: listed once, under the
    # embedding's name, it is still the head's, so it trains, and nothing else does.
    from trainer_core_plugins.models.tiny_gpt import build
    from trainer_core import DataBundle, TensorSplit

    tokens = torch.randint(0, 11, (32, 9), generator=torch.Generator().manual_seed(0))
    data = DataBundle(TensorSplit(tokens[:, :-1], tokens[:, 1:]), TensorSplit(tokens[:8, :-1], tokens[:8, 1:]),
                      [chr(97 + i) for i in range(11)], (8,), task="language-model")
    model = build((8,), 11, width=16, depth=1, heads=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plugin = Freeze()
    trainer = run_tiny({"freeze": plugin}, data=data, model=model, epochs=1)
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert plugin.frozen_modules == ["everything but head"]
    assert changed == {n for n, p in trainer.model.named_parameters() if p is trainer.model.head.weight}
