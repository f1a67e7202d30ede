"""A tiny GPT: a causal transformer language model over token ids (pydoc-chars)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from trainer_core_plugins.models.weights import load_local


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position sees only itself and earlier positions."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)  # queries, keys and values in one matrix product
        self.proj = nn.Linear(width, width)
        self.proj_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        # -> 3 x batch x heads x length x head width
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.proj_dropout(self.proj(y.transpose(1, 2).reshape(batch, length, width)))


class Block(nn.Module):
    """A pre-norm transformer block: attention, then a 4x-wide MLP, each added to the residual stream."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyGPT(nn.Module):
    """Token and learned position embeddings, ``blocks``, a final ``norm`` and a
    ``head`` whose weight is the token embedding's (tied): logits for the next token."""

    def __init__(self, block_size: int, vocab_size: int, width: int, depth: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.block_size = block_size
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(block_size, width)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight
        self._init_weights(depth)

    @property
    def shard_blocks(self) -> list[nn.Module]:
        """What ``--strategy fsdp`` gathers one at a time: the transformer blocks (the
        embeddings, tied to the head, and the final norm stay with the root)."""
        return list(self.blocks)

    def _init_weights(self, depth: int) -> None:
        """GPT-2's: normal(0, 0.02), and the projections that add to the residual
        stream scaled by 1/sqrt(2 * depth), so its variance does not grow with depth."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for projection in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(projection.weight, std=0.02 / math.sqrt(2 * depth))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``B x T`` token ids (``T <= block_size``) -> ``B x T x vocabulary`` logits."""
        length = ids.shape[1]
        # (a traced graph cannot keep this check; tracing would only warn about it)
        if not torch.jit.is_tracing() and length > self.block_size:
            raise ValueError(f"sequence of {length} tokens is longer than the model's block_size of {self.block_size}")
        positions = torch.arange(length, device=ids.device)
        x = self.dropout(self.token_embedding(ids) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build(
    input_shape: tuple[int, ...],
    num_classes: int,
    width: int = 128,
    depth: int = 4,
    heads: int = 4,
    dropout: float = 0.0,
    weights: str | None = None,
    strict: bool = True,
) -> nn.Module:
    """A small causal transformer (GPT-style, pre-norm, tied input and output
    embeddings) for next-token prediction: its context length is the dataset's
    sequence length and its outputs the vocabulary.  At the defaults (about 0.8 M
    parameters) it trains on the CPU in minutes.

    :param width: size of the embeddings and of the residual stream.
    :param depth: number of transformer blocks.
    :param heads: attention heads per block; must divide width.
    :param dropout: dropout on embeddings, attention weights and residual branches.
    :param weights: a state dict, checkpoint or run folder to start from; layers
        of another shape (embeddings for another vocabulary) start fresh.
    :param strict: with ``weights``, any tensor outside the head that does not fit is an
        error; ``false`` lets such layers start fresh instead (with a warning).
    """
    if len(input_shape) != 1 or input_shape[0] < 1:
        raise ValueError(f"tiny-gpt needs token sequences, input shape (block_size,) (got {tuple(input_shape)})")
    for name, value in (("width", width), ("depth", depth), ("heads", heads)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1 (got {value})")
    if width % heads:
        raise ValueError(f"width must be a multiple of heads (got width={width}, heads={heads})")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1) (got {dropout})")
    model = TinyGPT(input_shape[0], num_classes, width, depth, heads, dropout)
    if weights is not None:
        load_local(model, "tiny-gpt", weights, strict)
    return model
