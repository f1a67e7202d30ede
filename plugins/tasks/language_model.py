"""Language modelling: predict each next token of a sequence."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

from trainer_core import Task

if TYPE_CHECKING:
    import torch

    from trainer_core import DataBundle


class LanguageModel(Task):
    """Next-token prediction on token sequences.

    Inputs are token ids ``N x T``; targets are the same sequences moved one
    token on (``N x T``); the model outputs ``N x T x vocabulary`` logits.  The
    dataset's ``classes`` are its vocabulary, a string per token id.  Metrics:
    ``val/loss`` (cross-entropy per token, in nats), ``val/perplexity`` and
    ``val/bits_per_token`` (bits per character for a character-level corpus).
    A prediction is the next token's probabilities; ``trainer generate``
    samples text from a prompt.
    """

    headline = "val/loss"
    modes = {"val/loss": "min", "val/perplexity": "min", "val/bits_per_token": "min"}
    export_doc = "logits N x sequence length x vocabulary: at each position, scores of the next token"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        """:param label_smoothing: share of each target's probability spread over the other tokens."""
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1) (got {label_smoothing})")
        self.label_smoothing = label_smoothing

    def check(self, data: DataBundle) -> None:
        from trainer_core import held_targets

        vocabulary = len(data.classes)
        if vocabulary < 2:
            raise ValueError("the dataset has no vocabulary (classes: a string per token id)")
        for split in ("train", "val"):
            held = getattr(data, split)
            targets = held_targets(held)
            if targets is None:
                continue
            if targets.is_floating_point() or targets.dim() != 2 or held.inputs.shape != targets.shape:
                raise ValueError(f"its {split} targets are not token ids shaped like its inputs (N x sequence length)")
            if len(targets) and not 0 <= int(targets.min()) <= int(targets.max()) < vocabulary:
                raise ValueError(f"its {split} targets hold token ids outside its vocabulary 0..{vocabulary - 1}")

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        return F.cross_entropy(outputs.flatten(0, -2), targets.flatten(), label_smoothing=self.label_smoothing)

    def new_sums(self, device: torch.device) -> torch.Tensor:
        import torch

        return torch.zeros(2, dtype=torch.float64, device=device)  # loss x tokens, tokens

    def add_sums(self, sums: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        tokens = targets.numel()
        sums[0] += self.loss(outputs, targets).double() * tokens
        sums[1] += tokens

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        total, tokens = sums.tolist()
        loss = total / tokens
        return {"val/loss": loss, "val/perplexity": math.exp(min(loss, 700.0)), "val/bits_per_token": loss / math.log(2)}

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs[:, -1].float().softmax(dim=-1)

    def describe(self, prediction: torch.Tensor, names: list[str], top_k: int) -> dict[str, Any]:
        values, indices = prediction.topk(min(top_k, prediction.shape[0]))
        return {"next": [{"token": names[i], "index": i, "probability": p} for p, i in zip(values.tolist(), indices.tolist())]}

    def format(self, described: Mapping[str, Any]) -> list[str]:
        return [f"{rank}. {row['token']!r}  {100 * row['probability']:6.2f} %" for rank, row in enumerate(described["next"], 1)]

    def generate(self, model: torch.nn.Module, prompt: list[int], tokens: int, context: int, *,
                 temperature: float = 1.0, top_k: int = 0, seed: int = 0) -> list[int]:
        """``tokens`` new token ids sampled after ``prompt`` (the last ``context``
        ids are the model's input at each step).  ``temperature`` 0 picks the most
        likely token; ``top_k`` > 0 samples among the ``top_k`` likeliest only."""
        import torch

        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(tokens):
                window = torch.tensor([ids[-context:]], dtype=torch.int64, device=device)
                logits = model(window)[0, -1].float()
                if temperature == 0:
                    ids.append(int(logits.argmax()))
                    continue
                if top_k > 0:
                    cutoff = logits.topk(min(top_k, logits.numel())).values[-1]
                    logits = logits.masked_fill(logits < cutoff, -math.inf)
                probabilities = (logits / temperature).softmax(dim=-1)
                ids.append(int(torch.multinomial(probabilities, 1, generator=generator)))
        return ids[len(prompt):]
