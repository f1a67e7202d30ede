"""The offline datasets for the non-classification tasks, and the tabular ones, on their real data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer_core_plugins.datasets import fake_multilabel, pydoc_chars, tabular

# -- diabetes and breast cancer (scikit-learn's bundled tables) -------------------------


def test_diabetes_is_a_regression_on_ten_raw_features() -> None:
    data = tabular.load_diabetes()
    assert data.task == "regression" and data.classes == ["progression"] and data.input_shape == (10,)
    assert data.train.inputs.shape == (353, 10) and data.val.inputs.shape == (89, 10)
    assert data.train.inputs.dtype == torch.float32 and data.train.targets.dtype == torch.float32
    assert data.train.targets.shape == (353,) and data.val.targets.shape == (89,)
    assert data.train.inputs[:, 0].max() > 50  # age in years: raw units, not scikit-learn's pre-scaled copy


def test_diabetes_normalises_with_training_statistics_only() -> None:
    data = tabular.load_diabetes()
    x_train, y_train, x_val, _ = tabular.diabetes_split()
    assert np.allclose(data.mean, x_train.mean(axis=0)) and np.allclose(data.std, x_train.std(axis=0))
    assert not np.allclose(data.mean, np.concatenate([x_train, x_val]).mean(axis=0))
    assert all(isinstance(v, float) for v in (*data.mean, *data.std)) and len(data.mean) == len(data.std) == 10
    assert torch.equal(data.train.targets, torch.from_numpy(y_train).float())  # the split baselines use


def test_feature_stats_never_divide_by_zero() -> None:
    _, std = tabular.feature_stats(np.array([[1.0, 2.0], [1.0, 4.0]]))
    assert std == (1.0, 1.0)


def test_diabetes_split_follows_its_seed() -> None:
    assert np.array_equal(tabular.diabetes_split(split_seed=3)[0], tabular.diabetes_split(split_seed=3)[0])
    assert not np.array_equal(tabular.diabetes_split(split_seed=3)[0], tabular.diabetes_split(split_seed=4)[0])


def test_breast_cancer_is_a_stratified_binary_classification() -> None:
    data = tabular.load_breast_cancer()
    assert data.task == "classification" and data.classes == ["malignant", "benign"] and data.input_shape == (30,)
    assert data.train.inputs.shape == (455, 30) and data.val.inputs.shape == (114, 30)
    assert data.train.inputs.dtype == torch.float32 and data.train.targets.dtype == torch.int64
    assert set(data.train.targets.tolist()) == {0, 1}
    share = 357 / 569  # benign in the whole set
    for split in (data.train, data.val):
        assert abs(split.targets.float().mean().item() - share) < 0.01
    assert np.allclose(data.mean, data.train.inputs.double().mean(0).numpy(), rtol=1e-5)


@pytest.mark.parametrize("load", [tabular.load_diabetes, tabular.load_breast_cancer])
@pytest.mark.parametrize("fraction", [0, 1, -0.1])
def test_tabular_rejects_a_bad_val_fraction(load, fraction: float) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="val_fraction must be between 0 and 1"):
        load(val_fraction=fraction)


# -- pydoc-chars (Python's help texts) --------------------------------------------------


@pytest.fixture(scope="module")
def text() -> str:
    return pydoc_chars.corpus_text()


@pytest.fixture(scope="module")
def bundle():  # type: ignore[no-untyped-def]
    return pydoc_chars.load(block_size=64)


def test_corpus_is_the_sorted_help_topics(text: str) -> None:
    from pydoc_data.topics import topics

    assert len(text) > 400_000 and text == pydoc_chars.corpus_text()
    first = min(topics)
    assert text.startswith(topics[first] + "\n\n")


def test_pydoc_bundle_holds_next_character_sequences(bundle, text: str) -> None:  # type: ignore[no-untyped-def]
    assert bundle.task == "language-model" and bundle.input_shape == (64,)
    assert bundle.mean is None and bundle.std is None
    assert bundle.classes == pydoc_chars.vocabulary(text) and set(text) == set(bundle.classes)
    assert all(len(char) == 1 for char in bundle.classes)
    for split in (bundle.train, bundle.val):
        assert split.inputs.dtype == split.targets.dtype == torch.int64
        assert split.inputs.shape == split.targets.shape and split.inputs.shape[1] == 64
        assert torch.equal(split.inputs[:, 1:], split.targets[:, :-1])  # targets: the inputs shifted by one
        assert int(split.inputs.max()) < len(bundle.classes)


def test_pydoc_splits_by_position(bundle, text: str) -> None:  # type: ignore[no-untyped-def]
    train_text, val_text = pydoc_chars.split_text(text, 0.1)
    assert train_text + val_text == text and len(val_text) == pytest.approx(0.1 * len(text), abs=1)
    vocab = bundle.classes
    # training windows run through the head of the text, in order, non-overlapping by default
    first_train = pydoc_chars.decode(bundle.train.inputs[0].tolist(), vocab)
    assert train_text.startswith(first_train)
    last = bundle.train.inputs.shape[0] - 1
    assert pydoc_chars.decode(bundle.train.targets[last].tolist(), vocab) == train_text[64 * last + 1 : 64 * last + 65]
    # validation windows come only from the tail, and predict each character at most once
    val_targets = pydoc_chars.decode(bundle.val.targets.flatten().tolist(), vocab)
    assert val_text[1:].startswith(val_targets) and len(val_text) - 1 - len(val_targets) < 64
    assert pydoc_chars.decode(bundle.val.inputs[0].tolist(), vocab) == val_text[:64]


def test_stride_overlaps_training_windows_only() -> None:
    plain, overlapping = pydoc_chars.load(block_size=64), pydoc_chars.load(block_size=64, stride=16)
    assert len(overlapping.train) > 3.9 * len(plain.train)
    assert torch.equal(overlapping.train.inputs[1, :48], plain.train.inputs[0, 16:])
    assert torch.equal(overlapping.val.inputs, plain.val.inputs)


def test_encode_decode_round_trip(text: str) -> None:
    vocab = pydoc_chars.vocabulary(text)
    sample = text[1000:3000]
    ids = pydoc_chars.encode(sample, vocab)
    assert pydoc_chars.decode(ids, vocab) == sample and max(ids) < len(vocab)
    with pytest.raises(ValueError, match="character '€' is not in the vocabulary"):
        pydoc_chars.encode("abc€d", vocab)
    with pytest.raises(ValueError, match="token id -1 is outside the vocabulary"):
        pydoc_chars.decode([0, -1], vocab)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"block_size": 0}, "block_size must be >= 1"),
        ({"val_fraction": 1.0}, "val_fraction must be between 0 and 1"),
        ({"stride": -1}, "stride must be >= 0"),
        ({"block_size": 100_000}, "leaves no window in the validation text"),
        ({"block_size": 1_000, "val_fraction": 0.001}, "leaves no window in the validation text.*larger val_fraction"),
    ],
)
def test_pydoc_rejects_bad_options(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pydoc_chars.load(**options)  # type: ignore[arg-type]


# -- fake-multilabel (synthetic) --------------------------------------------------------


def test_fake_multilabel_is_multi_hot() -> None:
    data = fake_multilabel.load()
    assert data.task == "multilabel" and data.classes == [f"label{i}" for i in range(5)] and data.input_shape == (16,)
    assert data.train.inputs.shape == (512, 16) and data.val.inputs.shape == (256, 16)
    assert data.train.targets.shape == (512, 5) and data.train.targets.dtype == torch.float32
    assert set(data.train.targets.unique().tolist()) == {0.0, 1.0}
    assert (data.train.targets.sum(1) >= 2).float().mean() > 0.3  # several labels per sample are common
    assert data.mean is None and data.std is None


def test_fake_multilabel_frequencies_vary_within_a_sane_range() -> None:
    data = fake_multilabel.load(num_labels=6, train_size=4000)
    frequencies = data.train.targets.mean(0)
    assert frequencies.min() > 0.1 and frequencies.max() < 0.68
    assert frequencies[0] - frequencies[-1] > 0.3  # from common to rare


def test_fake_multilabel_is_learnable_from_the_features() -> None:
    data = fake_multilabel.load(noise=0.0)
    # with no noise each label is a linear threshold of the features: least squares separates it well
    x = torch.cat([data.train.inputs, torch.ones(len(data.train), 1)], 1)
    weights = torch.linalg.lstsq(x, data.train.targets - 0.5).solution
    x_val = torch.cat([data.val.inputs, torch.ones(len(data.val), 1)], 1)
    accuracy = ((x_val @ weights > 0).float() == data.val.targets).float().mean()
    assert accuracy > 0.85


def test_fake_multilabel_is_deterministic_by_seed() -> None:
    torch.manual_seed(123)
    first = fake_multilabel.load(seed=1)
    torch.manual_seed(456)  # the global generator plays no part
    again, other = fake_multilabel.load(seed=1), fake_multilabel.load(seed=2)
    assert torch.equal(first.train.inputs, again.train.inputs) and torch.equal(first.val.targets, again.val.targets)
    assert not torch.equal(first.train.inputs, other.train.inputs)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_labels": 0}, "num_labels must be >= 1"),
        ({"features": 0}, "features must be >= 1"),
        ({"val_size": 0}, "val_size must be >= 1"),
        ({"noise": -0.5}, "noise must be >= 0"),
    ],
)
def test_fake_multilabel_rejects_bad_options(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fake_multilabel.load(**options)  # type: ignore[arg-type]
