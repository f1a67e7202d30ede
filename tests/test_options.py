"""Options coerced by annotation, from command-line strings and TOML values."""

from pathlib import Path
from typing import Literal, Optional

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainer_core import UsageError
from trainer_core.options import bind_options, coerce, options_of


def factory(input_shape: tuple, num_classes: int, hidden: int = 100, rate: float = 0.5, act: Literal["relu", "tanh"] = "relu",
            pretrained: bool = False, weights: Optional[str] = None, layers: list[str] = ("fc",), root: Path = Path(".")):
    """A model factory with one option of each kind."""


def test_options_skip_what_the_core_passes():
    names = [o.name for o in options_of(factory, skip=("input_shape", "num_classes"))]
    assert names == ["hidden", "rate", "act", "pretrained", "weights", "layers", "root"]


def test_strings_from_the_command_line_are_coerced():
    bound = bind_options(factory, {"hidden": "64", "rate": "1e-3", "act": "tanh", "pretrained": "yes",
                                   "weights": "none", "layers": "layer4, fc", "root": "/data"},
                         owner="model", skip=("input_shape", "num_classes"))
    assert bound == {"hidden": 64, "rate": 0.001, "act": "tanh", "pretrained": True, "weights": None,
                     "layers": ["layer4", "fc"], "root": Path("/data")}


def test_toml_values_keep_their_types():
    bound = bind_options(factory, {"hidden": 64, "rate": 1, "pretrained": False, "layers": ["a"]}, owner="model",
                         skip=("input_shape", "num_classes"))
    assert bound == {"hidden": 64, "rate": 1.0, "pretrained": False, "layers": ["a"]}


@pytest.mark.parametrize("key, value, kind", [("hidden", "many", "int"), ("hidden", 2.5, "int"), ("hidden", True, "int"),
                                              ("act", "gelu", "relu|tanh"), ("pretrained", "maybe", "bool"),
                                              ("rate", "fast", "float")])
def test_ill_typed_values_name_the_expected_type(key, value, kind):
    with pytest.raises(UsageError, match=rf"option model.{key}=.* is not a valid {kind}; model accepts: hidden: int = 100"):
        bind_options(factory, {key: value}, owner="model", skip=("input_shape", "num_classes"))


def test_missing_required_option_says_how_to_set_it():
    def needs(path: str) -> None:
        pass

    with pytest.raises(UsageError, match=r"dataset needs option 'path' \(set it with -o dataset.path=VALUE\)"):
        bind_options(needs, {}, owner="dataset")


@given(st.integers(min_value=-10**12, max_value=10**12))
def test_any_integer_round_trips_through_its_string(n):
    assert coerce(str(n), int) == n
    assert coerce(str(n), float) == float(n)
    assert coerce(str(n), Optional[int]) == n


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_any_float_round_trips_through_repr(x):
    assert coerce(repr(x), float) == x


@given(st.text())
def test_text_never_crashes_the_coercion(text):
    # Every string either coerces or raises ValueError (which callers turn into a one-line error).
    for kind in (int, float, bool, Literal["a", "b"], Optional[int], list[int]):
        try:
            coerce(text, kind)
        except ValueError:
            pass


@given(st.booleans())
def test_booleans_accept_their_spellings(flag):
    for spelling in ({"true", "1", "yes", "on", "TRUE"} if flag else {"false", "0", "no", "off", "False"}):
        assert coerce(spelling, bool) is flag
