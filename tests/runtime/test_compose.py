import numpy as np
import pytest

from forgetrt.runtime import BankSnapshot, InvalidInputError, UnknownNameError


@pytest.fixture
def state():
    m = np.arange(12, dtype=np.float32).reshape(3, 4)
    return BankSnapshot(1, ("a", "b", "c"), m, {"eu": {"b": 1.0}, "mix": {"a": 0.5, "c": -1.0}}, (-1.0, 1.0))


@pytest.mark.parametrize(
    "forget, row",
    [
        (None, [0, 0, 0]),
        ([], [0, 0, 0]),
        (["a", "c"], [1, 0, 1]),
        ({"b": 0.25}, [0, 0.25, 0]),
        ("eu", [0, 1, 0]),
        ("mix", [0.5, 0, -1]),
        ([0.1, -0.2, 0.3], [0.1, -0.2, 0.3]),
        (np.array([1.0, 0.0, -1.0]), [1, 0, -1]),
    ],
)
def test_coeff_rows(state, forget, row):
    np.testing.assert_allclose(state.coeff_row(forget), row, rtol=1e-6)


@pytest.mark.parametrize(
    "forget, err, msg",
    [
        (["zzz"], UnknownNameError, "unknown vector 'zzz'; valid: a, b, c"),
        ({"a": 1.0, "q": 1.0}, UnknownNameError, "unknown vector 'q'"),
        ("us", UnknownNameError, "unknown policy 'us'; valid: eu, mix"),
        ("a", InvalidInputError, "is a vector, not a policy"),
        ({"a": 1.5}, InvalidInputError, "outside the bundle's coefficient range"),
        ({"a": float("nan")}, InvalidInputError, "finite"),
        ({"a": "x"}, InvalidInputError, "must be a number"),
        ([0.1, 0.2], InvalidInputError, "K=3"),
        (["a", "a"], InvalidInputError, "repeat"),
        (42, InvalidInputError, "forget must be"),
    ],
)
def test_bad_forget_specs(state, forget, err, msg):
    with pytest.raises(err, match=msg):
        state.coeff_row(forget)


def test_state_is_immutable_and_validated(state):
    with pytest.raises(ValueError):
        state.matrix[0, 0] = 5
    with pytest.raises(UnknownNameError, match="policy 'p'"):
        BankSnapshot(0, ("a",), np.zeros((1, 4)), {"p": {"b": 1.0}})
    with pytest.raises(InvalidInputError, match="NaN"):
        BankSnapshot(0, ("a",), np.full((1, 4), np.nan))
