"""The tiny-gpt language model: shapes, causality, tied embeddings, learning, export."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from trainer_core_plugins.models import tiny_gpt

BLOCK, VOCAB = 16, 11


def small(**options: float) -> nn.Module:
    torch.manual_seed(0)
    return tiny_gpt.build((BLOCK,), VOCAB, width=32, depth=2, heads=4, **options)  # type: ignore[arg-type]


def test_logits_per_position_over_the_vocabulary() -> None:
    model = small()
    ids = torch.randint(0, VOCAB, (3, BLOCK))
    assert model(ids).shape == (3, BLOCK, VOCAB)
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == 2


def test_defaults_build_the_documented_model() -> None:
    model = tiny_gpt.build((128,), 103)
    assert len(model.blocks) == 4 and model.norm.normalized_shape == (128,)
    assert 0.7e6 < sum(p.numel() for p in model.parameters()) < 0.9e6  # "about 0.8 M parameters"


def test_no_position_sees_the_future() -> None:
    model = small().eval()
    ids = torch.randint(0, VOCAB, (2, BLOCK))
    changed = ids.clone()
    changed[:, 9] = (ids[:, 9] + 1) % VOCAB
    before, after = model(ids), model(changed)
    assert torch.allclose(before[:, :9], after[:, :9], atol=1e-6)
    assert not torch.allclose(before[:, 9:], after[:, 9:], atol=1e-4)  # the change is seen from there on


def test_head_is_tied_to_the_token_embedding() -> None:
    model = small()
    assert model.head.weight is model.token_embedding.weight and model.head.bias is None
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.2)  # GPT-2's initialisation
    names = [name for name, _ in model.named_parameters()]
    assert "head.weight" not in names  # one parameter, counted once


def test_shorter_sequences_work_and_longer_ones_are_refused() -> None:
    model = small().eval()
    ids = torch.randint(0, VOCAB, (2, BLOCK))
    assert torch.allclose(model(ids[:, :5]), model(ids)[:, :5], atol=1e-5)  # a prompt: the same logits
    assert model(ids[:, :1]).shape == (2, 1, VOCAB)
    with pytest.raises(ValueError, match="sequence of 17 tokens is longer than the model's block_size of 16"):
        model(torch.zeros(1, BLOCK + 1, dtype=torch.long))


def test_a_few_adam_steps_learn_a_repeated_pattern() -> None:
    model = small()
    pattern = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6]).repeat(5)
    ids = torch.stack([pattern[i : i + BLOCK + 1] for i in range(8)])
    inputs, targets = ids[:, :-1], ids[:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 2.0  # about ln 11 at the start
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"width": 30, "heads": 4}, "width must be a multiple of heads"),
        ({"depth": 0}, "depth must be >= 1"),
        ({"heads": 0}, "heads must be >= 1"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_options_are_refused(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_gpt.build((BLOCK,), VOCAB, **options)  # type: ignore[arg-type]


def test_needs_token_sequences() -> None:
    with pytest.raises(ValueError, match=r"input shape \(block_size,\) \(got \(1, 8, 8\)\)"):
        tiny_gpt.build((1, 8, 8), 10)


def test_weights_load_and_a_new_vocabulary_starts_fresh(tmp_path: Path) -> None:
    trained = small()
    path = tmp_path / "weights.pt"
    torch.save(trained.state_dict(), path)
    same = tiny_gpt.build((BLOCK,), VOCAB, width=32, depth=2, heads=4, weights=str(path))
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), trained.state_dict().values()))
    other = tiny_gpt.build((BLOCK,), VOCAB + 1, width=32, depth=2, heads=4, weights=str(path))
    assert torch.equal(other.blocks[0].attn.qkv.weight, trained.blocks[0].attn.qkv.weight)
    assert other.head.weight is other.token_embedding.weight and other.head.weight.shape == (VOCAB + 1, 32)
    with pytest.raises(ValueError, match="tiny-gpt has no ImageNet weights"):
        tiny_gpt.build((BLOCK,), VOCAB, weights="imagenet")


def test_exports_with_a_dynamic_batch_and_matches_eager() -> None:
    model = small().eval()
    example = torch.randint(0, VOCAB, (2, BLOCK))
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    other = torch.randint(0, VOCAB, (5, BLOCK))
    assert torch.allclose(program.module()(other), model(other), atol=1e-5)


def test_traces_without_warnings_and_matches_eager() -> None:
    model = small().eval()
    example, other = torch.randint(0, VOCAB, (2, BLOCK)), torch.randint(0, VOCAB, (5, BLOCK))
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # a check the trace would silently drop
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's deprecation notice
        traced = torch.jit.trace(model, example)
    assert torch.allclose(traced(other), model(other), atol=1e-5)
