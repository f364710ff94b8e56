"""Choosing a trained vector's strength on validation data (never on test data).

A forget vector δ is trained with fixed loss weights; how hard it pushes is then one scalar away: the
served vector is s·δ. Calibration picks s from the recipe's grid by measuring the frozen model with
s·δ on a subsample of the forget set (training data) and on the validation split
(:class:`~forgetrt.train.data.ValidationSplit`):

``ua-target`` (class-wise)
    the smallest s whose UA reaches ``recipe.ua_target`` on (a sample of) the forget set, i.e. the
    least collateral damage that still forgets; if no s reaches it, the s with the highest UA, and the
    record says the target was missed. The record also lists, per s, the UA on the validation split's
    images of the forgotten classes (unseen images of those classes) and the accuracy the validation
    images of the other classes lose (the collateral damage).
``retrain-proxy`` (data-wise)
    a universal δ cannot tell random forget samples from retain samples, so the honest goal is
    Retrain-like behaviour, not misclassification. With a validation split the classifier never saw,
    Retrain's metrics are estimated from the original model: UA* = 100 − held-out accuracy, RA* and TA*
    the original's retain and held-out accuracy, MIA* the share of held-out samples the membership
    attack calls non-members. Every s in {0} ∪ grid is scored by the mean |difference| to those
    targets, and the best is kept. s = 0 (no vector) is always a candidate, so on this estimate the
    chosen vector never does worse than no vector. Without a held-out split there is no estimate of
    held-out accuracy, and s = 0 is chosen, saying why.

Each record lists every strength tried with its validation metrics, so a reader sees the trade-off.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from forgetrt.runtime.errors import InvalidInputError

from .data import Dataset, ForgetSplit
from .loops import accuracy, predict_logits
from .metrics import mia_efficacy, true_class_confidence
from .recipes import VectorRecipe

__all__ = ["Calibration", "calibrate_vector", "calibration_mode"]

#: validation metrics are measured on at most this many images per role (forget, retain, validation)
SAMPLE_CAP = 2000


@dataclass
class Calibration:
    mode: str  # "none" | "ua-target" | "retrain-proxy"
    strength: float
    reason: str
    reached: bool | None = None  # ua-target: whether the UA target was reached
    targets: dict[str, float] = field(default_factory=dict)  # retrain-proxy: the estimated Retrain metrics
    grid: list[dict[str, float]] = field(default_factory=list)  # per strength tried: its validation metrics

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibration_mode(recipe: VectorRecipe, split: ForgetSplit) -> str:
    if recipe.calibrate != "auto":
        return recipe.calibrate
    return "ua-target" if split.classes else "retrain-proxy"


def _sample(idx: np.ndarray, rng: np.random.Generator, cap: int = SAMPLE_CAP) -> np.ndarray:
    idx = np.asarray(idx, np.int64)
    return np.sort(rng.choice(idx, cap, replace=False)) if len(idx) > cap else idx


class _Probe:
    """Logits of the frozen model on fixed training-image subsets with s·δ added."""

    def __init__(self, model: nn.Module, ds: Dataset, delta: np.ndarray, sets: dict[str, np.ndarray]) -> None:
        self.model, self.ds, self.delta, self.sets = model, ds, np.asarray(delta, np.float32), sets

    def logits(self, name: str, s: float) -> np.ndarray:
        idx = self.sets[name]
        return predict_logits(self.model, self.ds.x_train[idx], self.ds.scale, None if s == 0 else s * self.delta)

    def acc(self, name: str, s: float) -> float:
        return accuracy(self.logits(name, s), self.ds.y_train[self.sets[name]])


@torch.no_grad()
def calibrate_vector(
    model: nn.Module,
    ds: Dataset,
    split: ForgetSplit,
    delta: np.ndarray,
    recipe: VectorRecipe,
    *,
    val_idx: np.ndarray,
    val_held_out: bool,
) -> Calibration:
    """Choose the strength of ``delta`` for ``split`` (see the module docstring).

    ``val_idx``: the validation split's training indices; ``val_held_out``: whether the classifier was
    trained without them (only then do they estimate held-out accuracy).
    """
    mode = calibration_mode(recipe, split)
    if mode == "none":
        return Calibration("none", 1.0, "calibration off: the vector as trained")
    if len(val_idx) == 0:
        raise InvalidInputError("calibration needs a non-empty validation split")
    rng = np.random.default_rng(recipe.seed)
    model.eval()
    if mode == "ua-target":
        return _ua_target(model, ds, split, delta, recipe, val_idx, rng)
    return _retrain_proxy(model, ds, split, delta, recipe, val_idx, val_held_out, rng)


def _ua_target(model, ds, split, delta, recipe, val_idx, rng) -> Calibration:
    classes = split.classes or ()
    in_forgotten = np.isin(ds.y_train[val_idx], classes) if classes else np.zeros(len(val_idx), bool)
    sets = {"forget": _sample(split.forget, rng), "val_rest": _sample(val_idx[~in_forgotten], rng)}
    if in_forgotten.any():
        sets["val_forget"] = _sample(val_idx[in_forgotten], rng)
    probe = _Probe(model, ds, delta, sets)
    base_rest = probe.acc("val_rest", 0.0) if len(sets["val_rest"]) else float("nan")
    grid = []
    for s in sorted(recipe.strengths):
        row = {"strength": float(s), "UA_forget": 100.0 - probe.acc("forget", s)}
        if "val_forget" in sets:
            row["UA_val"] = 100.0 - probe.acc("val_forget", s)
        if len(sets["val_rest"]):
            row["val_acc_drop"] = base_rest - probe.acc("val_rest", s)
        grid.append(row)
    hit = [r for r in grid if r["UA_forget"] >= recipe.ua_target]
    if hit:
        best = hit[0]  # grid is ascending: the smallest strength that forgets enough
        why = f"smallest strength with UA >= {recipe.ua_target:g} on the forget samples"
        return Calibration("ua-target", best["strength"], why, True, {}, grid)
    best = max(grid, key=lambda r: (r["UA_forget"], -r["strength"]))
    why = f"no strength reached UA {recipe.ua_target:g}; the highest UA ({best['UA_forget']:.2f}) was kept"
    return Calibration("ua-target", best["strength"], why, False, {}, grid)


def _retrain_proxy(model, ds, split, delta, recipe, val_idx, val_held_out, rng) -> Calibration:
    if not val_held_out:
        return Calibration(
            "retrain-proxy",
            0.0,
            "the classifier holds out no validation split, so held-out accuracy (Retrain's target) cannot be "
            "estimated without test data: no vector (strength 0) is the choice that cannot do harm; retrain the "
            "model with `train-model --val-fraction` to calibrate data-wise vectors",
        )
    val = _sample(val_idx, rng)
    half = np.zeros(len(val), bool)
    half[rng.permutation(len(val))[: len(val) // 2]] = True
    sets = {"forget": _sample(split.forget, rng), "retain": _sample(split.retain, rng), "val": val}
    probe = _Probe(model, ds, delta, sets)
    y = {k: ds.y_train[v] for k, v in sets.items()}

    def measure(s: float) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        logits = {k: probe.logits(k, s) for k in sets}
        conf = {k: true_class_confidence(logits[k], y[k]) for k in sets}
        m = {
            "UA": 100.0 - accuracy(logits["forget"], y["forget"]),
            "RA": accuracy(logits["retain"], y["retain"]),
            "TA": accuracy(logits["val"], y["val"]),
            "MIA_efficacy": mia_efficacy(conf["retain"], conf["val"], conf["forget"], seed=recipe.seed),
        }
        return m, conf

    m0, conf0 = measure(0.0)
    targets = {
        "UA": 100.0 - m0["TA"],
        "RA": m0["RA"],
        "TA": m0["TA"],
        # a Retrain model's forget samples are non-members: the attack's rate on held-out images it was not fit on
        "MIA_efficacy": mia_efficacy(conf0["retain"], conf0["val"][half], conf0["val"][~half], seed=recipe.seed),
    }
    grid = []
    for s in [0.0, *sorted(recipe.strengths)]:
        m = m0 if s == 0 else measure(s)[0]
        gap = float(np.mean([abs(m[k] - targets[k]) for k in targets]))
        grid.append({"strength": float(s), **m, "proxy_gap": gap})
    best = min(grid, key=lambda r: (r["proxy_gap"], r["strength"]))
    why = (
        f"strength with the smallest estimated gap to Retrain ({best['proxy_gap']:.2f}; "
        f"no vector: {grid[0]['proxy_gap']:.2f})"
        if best["strength"] > 0
        else f"no strength beat no vector on the estimated gap to Retrain ({grid[0]['proxy_gap']:.2f})"
    )
    return Calibration("retrain-proxy", best["strength"], why, None, targets, grid)
