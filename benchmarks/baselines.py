"""Reference numbers that recipes are reported against, on the datasets' own splits.

    python benchmarks/baselines.py [--block-size 128] [--val-fraction 0.1]

* diabetes: scikit-learn's least-squares linear regression, R^2 on the
  validation split of the ``diabetes`` dataset (the same rows).
* pydoc-chars: character n-gram count models (unigram, bigram, trigram) fitted
  on the training text, in bits per character on exactly the characters the
  dataset's validation windows ask a model to predict: comparable to a
  language model's validation loss in bits per token.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np
import torch

from trainer_core_plugins.datasets import pydoc_chars
from trainer_core_plugins.datasets.tabular import diabetes_split

# Prior weight of each order's lower-order estimate (interpolated Dirichlet smoothing):
# an unseen context falls back to the shorter one; chosen once, not tuned per split.
PRIOR_WEIGHT = 1.0
MAX_ORDER = 3  # dense count tables: vocabulary^order entries


def diabetes_linear_r2(val_fraction: float = 0.2, split_seed: int = 0) -> float:
    """R^2 on the validation split of least-squares linear regression fitted on
    the training split of :func:`trainer_core_plugins.datasets.tabular.diabetes_split`."""
    from sklearn.linear_model import LinearRegression

    x_train, y_train, x_val, y_val = diabetes_split(val_fraction, split_seed)
    return float(LinearRegression().fit(x_train, y_train).score(x_val, y_val))


def ngram_bits_per_char(order: int, train_text: str, val_text: str, vocabulary: Sequence[str],
                        block_size: int = 128) -> float:
    """Average bits per character of an order-``order`` character model (1:
    unigram, 2: bigram, 3: trigram) fitted on ``train_text``, over exactly the
    targets of ``val_text``'s validation windows (:func:`trainer_core_plugins.datasets.pydoc_chars.windows`,
    non-overlapping, ``block_size`` long), each predicted from the characters
    before it in its window, as a language model sees them.

    Probabilities are counts smoothed towards the next lower order,
    ``P(c | h) = (n(h c) + a P(c | h')) / (n(h) + a)`` with ``h'`` the context
    ``h`` without its first character and ``a`` = :data:`PRIOR_WEIGHT`; the
    unigram is smoothed towards uniform, so every character has a probability
    above zero.  A window's first target has one character of context, so a
    trigram predicts it as the bigram does.
    """
    if not 1 <= order <= MAX_ORDER:
        raise ValueError(f"order must be 1 to {MAX_ORDER} (got {order})")
    size = len(vocabulary)
    train = np.array(pydoc_chars.encode(train_text, vocabulary), dtype=np.int64)
    split = pydoc_chars.windows(torch.tensor(pydoc_chars.encode(val_text, vocabulary)), block_size, block_size)
    inputs, targets = split.inputs.numpy(), split.targets.numpy()

    # probability of each target under each order, from the lowest up
    prob = (np.bincount(train, minlength=size)[targets] + PRIOR_WEIGHT / size) / (len(train) + PRIOR_WEIGHT)
    for n in range(2, order + 1):
        # n-gram counts as a dense table indexed by the n characters' ids in base `size`
        codes = sum(train[i : len(train) - n + 1 + i] * size ** (n - 1 - i) for i in range(n))
        counts = np.bincount(codes, minlength=size**n)
        context_counts = counts.reshape(-1, size).sum(axis=1)
        # context of target j: the inputs j-n+2 .. j of its window (targets j are inputs j+1)
        context = sum(np.roll(inputs, k, axis=1) * size**k for k in range(n - 1))
        # a window's first n-2 targets lack a full context: they keep the lower order's probability
        context = context[:, n - 2 :]
        higher = (counts[context * size + targets[:, n - 2 :]] + PRIOR_WEIGHT * prob[:, n - 2 :]) / (
            context_counts[context] + PRIOR_WEIGHT
        )
        prob = np.concatenate([prob[:, : n - 2], higher], axis=1)
    return float(-np.log2(prob).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-size", type=int, default=128, help="pydoc-chars block_size (default 128)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="pydoc-chars val_fraction (default 0.1)")
    args = parser.parse_args()

    text = pydoc_chars.corpus_text()
    vocabulary = pydoc_chars.vocabulary(text)
    train_text, val_text = pydoc_chars.split_text(text, args.val_fraction)
    predicted = (len(val_text) - 1) // args.block_size * args.block_size
    print(f"{'dataset':14s} {'baseline':28s} {'metric':34s} value")
    r2 = diabetes_linear_r2()
    print(f"{'diabetes':14s} {'linear regression':28s} {'R^2, validation (20 %, seed 0)':34s} {r2:.3f}")
    for order, name in ((1, "unigram"), (2, "bigram"), (3, "trigram")):
        bits = ngram_bits_per_char(order, train_text, val_text, vocabulary, args.block_size)
        print(f"{'pydoc-chars':14s} {name + ' counts':28s} {'bits/char, validation targets':34s} {bits:.3f}")
    print(f"(pydoc-chars: python {sys.version.split()[0]}, {len(text):,} characters, vocabulary {len(vocabulary)}, "
          f"{len(train_text):,} train; {predicted:,} validation targets in windows of {args.block_size}; "
          f"a model's loss in nats / ln 2 = bits)")


if __name__ == "__main__":
    main()
