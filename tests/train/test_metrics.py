import numpy as np
import pytest

from forgetrt.runtime.errors import InvalidInputError
from forgetrt.train.metrics import avg_gap, format_table, mia_efficacy


def test_mia_efficacy_separates_members_from_non_members():
    rng = np.random.default_rng(0)
    members = np.clip(rng.normal(0.98, 0.01, 500), 0, 1)  # train confidences: near 1
    non_members = np.clip(rng.normal(0.6, 0.15, 500), 0, 1)  # test confidences: lower
    # forget samples that look like test data -> called non-member (unlearned)
    assert mia_efficacy(members, non_members, np.clip(rng.normal(0.6, 0.15, 200), 0, 1)) > 80
    # forget samples that look like training data -> called member (not unlearned)
    assert mia_efficacy(members, non_members, np.clip(rng.normal(0.98, 0.01, 200), 0, 1)) < 20
    with pytest.raises(InvalidInputError):
        mia_efficacy(members, non_members, np.zeros(0))


def test_avg_gap_and_table():
    a = {"UA": 100.0, "RA": 99.0, "TA": 95.0, "MIA_efficacy": 100.0}
    b = {"UA": 100.0, "RA": 100.0, "TA": 94.0, "MIA_efficacy": 98.0}
    assert avg_gap(a, b) == pytest.approx((0 + 1 + 1 + 2) / 4)
    with pytest.raises(InvalidInputError, match="missing"):
        avg_gap(a, {"UA": 1.0})
    table = format_table({"x": a, "y": {**b, "TA_forgotten": float("nan")}})
    assert "MIA_efficacy" in table.splitlines()[0] and "100.00" in table
