"""Characters of Python's own help texts (``pydoc_data.topics``): a language-modelling
corpus of about 465,000 characters that every Python installation holds offline.

The text, and so the vocabulary, is that of the running Python version: a model
trained under one version may meet a different vocabulary under another.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from trainer_core import DataBundle, TensorSplit


def corpus_text() -> str:
    """The help topics' texts in sorted topic order, separated by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def vocabulary(text: str) -> list[str]:
    """The distinct characters of ``text``, sorted: token id ``i`` is ``vocabulary[i]``."""
    return sorted(set(text))


def encode(text: str, vocabulary: Sequence[str]) -> list[int]:
    """Token ids of ``text``; a character outside ``vocabulary`` is a ValueError naming it."""
    ids = {char: i for i, char in enumerate(vocabulary)}
    try:
        return [ids[char] for char in text]
    except KeyError as exc:
        unknown = exc.args[0]
        raise ValueError(f"character {unknown!r} is not in the vocabulary of {len(vocabulary)} characters") from None


def decode(ids: Iterable[int], vocabulary: Sequence[str]) -> str:
    """The text of token ids; an id outside ``0 .. len(vocabulary) - 1`` is a ValueError."""
    chars = []
    for i in ids:
        if not 0 <= i < len(vocabulary):
            raise ValueError(f"token id {i} is outside the vocabulary (0 to {len(vocabulary) - 1})")
        chars.append(vocabulary[i])
    return "".join(chars)


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """``(train, val)`` by position: the first ``1 - val_fraction`` of the characters
    train, the rest validate (a random split would leak text into validation)."""
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]


def windows(ids: torch.Tensor, block_size: int, stride: int) -> TensorSplit:
    """Windows of ``block_size + 1`` ids starting every ``stride`` ids: inputs are
    a window's first ``block_size`` ids, targets the same shifted by one (the next ids).

    Both are views of ``ids`` (no copy), so overlapping windows cost no memory."""
    chunks = ids.unfold(0, block_size + 1, stride)
    return TensorSplit(chunks[:, :-1], chunks[:, 1:])


def load(block_size: int = 128, val_fraction: float = 0.1, stride: int = 0, chars: int = 0) -> DataBundle:
    """Next-character prediction on Python's help texts: token-id sequences of
    ``block_size`` characters, targets shifted by one.  The first ``1 - val_fraction``
    of the text trains, the rest validates in non-overlapping windows, so every
    validation character is predicted at most once.

    :param block_size: characters per sequence: the model's context length.
    :param val_fraction: share of the text, taken from its end, held out for validation.
    :param stride: characters between the starts of training windows; 0 means
        ``block_size`` (non-overlapping), smaller values give more, overlapping windows.
    :param chars: use only the first ``chars`` characters of the text (0: all of it),
        for quick runs; the vocabulary is still the whole text's.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1 (got {block_size})")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (got {val_fraction})")
    if stride < 0:
        raise ValueError(f"stride must be >= 0, 0 meaning block_size (got {stride})")
    if chars < 0:
        raise ValueError(f"chars must be >= 0, 0 meaning all (got {chars})")
    text = corpus_text()
    vocab = vocabulary(text)
    train_text, val_text = split_text(text[:chars] if chars else text, val_fraction)
    for name, part, remedy in (("training", train_text, ""), ("validation", val_text, " or a larger val_fraction")):
        if len(part) < block_size + 1:
            raise ValueError(f"block_size={block_size} leaves no window in the {name} text ({len(part)} characters); "
                             f"use block_size <= {len(part) - 1}{remedy}")
    train_ids = torch.tensor(encode(train_text, vocab), dtype=torch.int64)
    val_ids = torch.tensor(encode(val_text, vocab), dtype=torch.int64)
    return DataBundle(
        train=windows(train_ids, block_size, stride or block_size),
        val=windows(val_ids, block_size, block_size),
        classes=vocab,
        input_shape=(block_size,),
        task="language-model",
    )
