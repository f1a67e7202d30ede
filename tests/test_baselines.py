"""benchmarks/baselines.py: the reference numbers, computed here on the datasets' real splits."""

from __future__ import annotations

import math
import sys
from types import ModuleType

import pytest

from trainer_core_plugins.datasets import pydoc_chars

def test_diabetes_linear_regression_explains_some_of_the_variance(baselines: ModuleType) -> None:
    r2 = baselines.diabetes_linear_r2()
    assert 0.3 < r2 < 0.6
    assert baselines.diabetes_linear_r2(split_seed=1) != r2  # measured on the split asked for


def test_ngram_bits_fall_with_order_and_stay_plausible(baselines: ModuleType) -> None:
    text = pydoc_chars.corpus_text()
    vocabulary = pydoc_chars.vocabulary(text)
    train, val = pydoc_chars.split_text(text, 0.1)
    bits = [baselines.ngram_bits_per_char(order, train, val, vocabulary) for order in (1, 2, 3)]
    assert math.log2(len(vocabulary)) > bits[0] > bits[1] > bits[2] > 1.5  # below uniform, better with context
    assert 4.2 < bits[0] < 5.2 and 3.0 < bits[1] < 3.8 and 2.1 < bits[2] < 2.9


def test_ngram_probabilities_sum_to_one(baselines: ModuleType) -> None:
    vocabulary, train = ["a", "b", "c"], "abcabcaab" * 3
    for order in (1, 2, 3):
        # one window "a b ?": bits average over its two targets, so 2^(-2 bits) = P(b | a) P(? | a b)
        first = 2 ** -baselines.ngram_bits_per_char(order, train, "ab", vocabulary, block_size=1)
        joint = [2 ** (-2 * baselines.ngram_bits_per_char(order, train, "ab" + c, vocabulary, block_size=2))
                 for c in vocabulary]
        assert sum(joint) == pytest.approx(first)
        assert min(joint) > 0  # "abb" never occurs in training, yet has a probability


def test_ngram_order_is_limited(baselines: ModuleType) -> None:
    with pytest.raises(ValueError, match="order must be 1 to 3"):
        baselines.ngram_bits_per_char(4, "ab", "ab", ["a", "b"])


def test_main_prints_the_table(baselines: ModuleType, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["baselines.py", "--block-size", "64"])
    baselines.main()
    out = capsys.readouterr().out
    for name in ("linear regression", "unigram counts", "bigram counts", "trigram counts", "windows of 64"):
        assert name in out
