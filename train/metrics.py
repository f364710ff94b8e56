"""Unlearning metrics, all measured with the forget vector applied.

- UA  = 100 − accuracy on the forget set
- RA  = accuracy on the retain training data
- TA  = test accuracy (class-wise: on the remaining classes; ``TA_forgotten`` on the forgotten ones);
  with a vector, ``TA_original`` is the same classifier's accuracy on the same test images without the
  vector and ``TA_drop = TA_original - TA`` what the vector costs there
- MIA_efficacy: the SalUn / Unlearn-Sparse protocol. An RBF SVC (C=3, gamma="auto") is fit on the
  true-class softmax confidence of equally many retain samples (members, label 1) and test samples
  (non-members, label 0); efficacy = share of forget samples it calls non-member.
- avg_gap: mean |difference| over UA, RA, TA, MIA_efficacy against a reference result (e.g. Retrain).

All values are percentages (0-100).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from forgetrt.runtime.errors import InvalidInputError

from .data import Dataset, ForgetSplit
from .loops import accuracy, predict_logits

__all__ = ["evaluate", "mia_efficacy", "true_class_confidence", "avg_gap", "format_table", "METRIC_KEYS"]

METRIC_KEYS = ("UA", "RA", "TA", "MIA_efficacy")


def true_class_confidence(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    return p[np.arange(len(y)), y]


def mia_efficacy(
    conf_retain: np.ndarray,
    conf_test: np.ndarray,
    conf_forget: np.ndarray,
    *,
    seed: int = 0,
    max_per_side: int | None = None,
) -> float:
    """Share (%) of forget samples an SVC trained on retain-vs-test confidences calls non-member."""
    from sklearn.svm import SVC

    n = min(len(conf_retain), len(conf_test))
    if max_per_side is not None:
        n = min(n, max_per_side)
    if n == 0 or len(conf_forget) == 0:
        raise InvalidInputError("MIA needs non-empty retain, test and forget sets")
    rng = np.random.default_rng(seed)
    members = rng.choice(conf_retain, n, replace=False) if len(conf_retain) > n else conf_retain
    non_members = rng.choice(conf_test, n, replace=False) if len(conf_test) > n else conf_test
    x = np.concatenate([members, non_members]).reshape(-1, 1)
    y = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    clf = SVC(C=3, gamma="auto", kernel="rbf")
    clf.fit(x, y)
    pred = clf.predict(conf_forget.reshape(-1, 1))
    return float((pred == 0).mean() * 100.0)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    ds: Dataset,
    split: ForgetSplit,
    delta: np.ndarray | None = None,
    *,
    seed: int = 0,
    mia_max_per_side: int | None = None,
    mask_forgotten: bool = False,
) -> dict[str, Any]:
    """UA, RA, TA (+ TA_forgotten for class-wise) and MIA_efficacy of ``model`` with ``delta`` added.

    ``mask_forgotten`` (class-wise only): the trivial output guard instead of, or on top of, a vector:
    the forgotten classes' logits are pushed to -1e9, so they are never predicted and get no probability.
    """
    tr = predict_logits(model, ds.x_train, ds.scale, delta)
    te = predict_logits(model, ds.x_test, ds.scale, delta)
    if mask_forgotten:
        if not split.classes:
            raise InvalidInputError("masking the output needs a class-wise forget spec")
        for z in (tr, te):
            z[:, list(split.classes)] = -1e9
    yf, yr = ds.y_train[split.forget], ds.y_train[split.retain]
    yt = ds.y_test[split.test]
    out: dict[str, Any] = {
        "UA": 100.0 - accuracy(tr[split.forget], yf),
        "RA": accuracy(tr[split.retain], yr),
        "TA": accuracy(te[split.test], yt),
    }
    if len(split.test_forgotten):
        out["TA_forgotten"] = accuracy(te[split.test_forgotten], ds.y_test[split.test_forgotten])
    if delta is not None or mask_forgotten:
        te0 = predict_logits(model, ds.x_test, ds.scale, rows=split.test)
        out["TA_original"] = accuracy(te0, yt)
        out["TA_drop"] = out["TA_original"] - out["TA"]
    out["MIA_efficacy"] = mia_efficacy(
        true_class_confidence(tr[split.retain], yr),
        true_class_confidence(te[split.test], yt),
        true_class_confidence(tr[split.forget], yf),
        seed=seed,
        max_per_side=mia_max_per_side,
    )
    out["n_forget"] = int(len(split.forget))
    out["n_retain"] = int(len(split.retain))
    out["n_test"] = int(len(split.test))
    if delta is not None:
        out["delta_l2"] = float(np.linalg.norm(np.asarray(delta, np.float64)))
        out["delta_linf"] = float(np.abs(delta).max())
    return out


def avg_gap(result: Mapping[str, Any], reference: Mapping[str, Any]) -> float:
    """Mean absolute difference over UA, RA, TA and MIA_efficacy (percentage points)."""
    missing = [k for k in METRIC_KEYS if k not in reference or k not in result]
    if missing:
        raise InvalidInputError(f"avg_gap needs {', '.join(METRIC_KEYS)} in both results; missing {missing}")
    return float(np.mean([abs(float(result[k]) - float(reference[k])) for k in METRIC_KEYS]))


def format_table(rows: Mapping[str, Mapping[str, Any]], keys: tuple[str, ...] | None = None) -> str:
    """A fixed-width text table: one row per result, one column per metric (percent, 2 decimals)."""
    keys = keys or tuple(
        k
        for k in ("UA", "RA", "TA", "TA_original", "TA_drop", "TA_forgotten", "MIA_efficacy", "avg_gap", "seconds")
        if any(k in r for r in rows.values())
    )
    name_w = max([len("name")] + [len(n) for n in rows])
    head = f"{'name':<{name_w}}  " + "  ".join(f"{k:>12}" for k in keys)
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append(
                f"{'-':>12}" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):>12.2f}"
            )
        lines.append(f"{name:<{name_w}}  " + "  ".join(cells))
    return "\n".join(lines)
