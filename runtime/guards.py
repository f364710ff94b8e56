"""Guards that keep mandatory vectors in force: no selectable combination may cancel them.

A bundle's mandatory vectors δ_m are added to every request; the selectable vectors are combined with
coefficients the request chooses (inside the bundle's coefficient range). If some allowed combination
Σ c_k v_k comes close to −δ_m, a request could undo the mandatory forgetting with allowed inputs. This
module measures that: the smallest relative residual ‖δ_m + Σ c_k v_k‖₂ / ‖δ_m‖₂ over the allowed
coefficients (exact bounded-variable least squares, scipy's BVLS), plus the cosine of every selectable
vector with every mandatory one (duplicates and near-duplicates). Export refuses a selectable set whose
residual is under the bundle's threshold, and the runtime refuses a hot swap that would produce one.

What it does not cover: a model is not linear, so coefficients can restore a forgotten class without
cancelling δ_m in L2 (a black-box search over allowed coefficients can find such inputs), and a client
who controls the pixels can search for images that undo any input-space vector. SECURITY.md measures
both; the output guard (the forgotten classes masked at the logits) is the defense that holds there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import MismatchError

__all__ = [
    "DEFAULT_CANCEL_THRESHOLD",
    "NEAR_DUPLICATE_COSINE",
    "GUARD_LOGIT",
    "Cancellation",
    "cancellation",
    "check_cancellation",
    "apply_guard",
]

#: what the output guard adds to a guarded class's logit: far below any real logit, finite in float32
#: (in float16 it becomes -inf, which masks just as well)
GUARD_LOGIT = -1.0e9

#: Refuse when the selectable vectors can remove more than 20% of the mandatory δ in L2 (residual < 0.8).
#: Measured on digits (CPU, 2026-11-27): keeping 90% / 80% / 70% of the class-9 vector lets class-9 test
#: accuracy climb from 8.9% to 17.8% / 24.4% / 53.3%; see SECURITY.md.
DEFAULT_CANCEL_THRESHOLD = 0.8
#: A selectable vector this parallel (or anti-parallel) to a mandatory one is refused whatever the range.
NEAR_DUPLICATE_COSINE = 0.95


@dataclass(frozen=True)
class Cancellation:
    residual: float  # smallest ‖δ_m + Σ c_k v_k‖ / ‖δ_m‖ over the allowed coefficients (1: cannot reduce it)
    coefficients: np.ndarray  # the minimizing coefficients, in selectable order
    max_cosine: float  # largest |cos| between a selectable and a mandatory vector
    worst_pair: tuple[str, str] | None  # (selectable, mandatory) names of that cosine
    converged: bool = True  # False: the solver stopped early and the residual is not proven (refused)


def _box_least_squares(a: np.ndarray, b: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, bool]:
    """argmin over c in [lo, hi]^K of ‖aᵀc + b‖², exactly (scipy's bounded-variable least squares, an
    active-set method on ``a`` itself, not its Gram matrix), and whether it converged."""
    from scipy.optimize import lsq_linear

    res = lsq_linear(a.T, -b, bounds=(lo, hi), method="bvls", tol=1e-12, max_iter=max(100, 20 * len(a)))
    return np.clip(res.x, lo, hi), bool(res.status > 0)


def cancellation(
    selectable: np.ndarray,
    mandatory: np.ndarray,
    coeff_range: tuple[float, float] | None,
    *,
    selectable_names: tuple[str, ...] = (),
    mandatory_vectors: dict[str, np.ndarray] | None = None,
) -> Cancellation:
    """How far the selectable vectors [K, N] can cancel the summed mandatory δ [N] within ``coeff_range``
    (None: unbounded); cosines against each of ``mandatory_vectors`` (name -> δ) when given."""
    a = np.asarray(selectable, np.float64).reshape(len(selectable), -1)
    b = np.asarray(mandatory, np.float64).ravel()
    norm = float(np.linalg.norm(b))
    if norm == 0 or len(a) == 0:
        return Cancellation(1.0, np.zeros(len(a)), 0.0, None, True)
    converged = True
    if coeff_range is None:
        c = -np.linalg.lstsq(a.T, b, rcond=None)[0]
    else:
        c, converged = _box_least_squares(a, b, float(coeff_range[0]), float(coeff_range[1]))
    residual = float(np.linalg.norm(a.T @ c + b) / norm)
    max_cos, pair = 0.0, None
    an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    for mname, mv in (mandatory_vectors or {"mandatory": b}).items():
        m = np.asarray(mv, np.float64).ravel()
        m = m / max(float(np.linalg.norm(m)), 1e-12)
        cos = np.abs(an @ m)
        i = int(cos.argmax())
        if cos[i] > max_cos:
            max_cos = float(cos[i])
            pair = (selectable_names[i] if i < len(selectable_names) else str(i), mname)
    return Cancellation(residual, c, max_cos, pair, converged)


def check_cancellation(
    selectable: np.ndarray,
    mandatory: np.ndarray,
    coeff_range: tuple[float, float] | None,
    threshold: float,
    *,
    selectable_names: tuple[str, ...] = (),
    mandatory_vectors: dict[str, np.ndarray] | None = None,
) -> Cancellation:
    """:func:`cancellation`, raising :class:`MismatchError` if a selectable combination can cancel more
    than ``1 - threshold`` of the mandatory δ, or a selectable vector near-duplicates a mandatory one."""
    res = cancellation(
        selectable, mandatory, coeff_range, selectable_names=selectable_names, mandatory_vectors=mandatory_vectors
    )
    if res.max_cosine >= NEAR_DUPLICATE_COSINE:
        raise MismatchError(
            f"selectable vector {res.worst_pair[0]!r} near-duplicates mandatory vector {res.worst_pair[1]!r} "
            f"(|cos| {res.max_cosine:.3f} >= {NEAR_DUPLICATE_COSINE}): "
            "a negative weight on it would cancel the mandatory one"
        )
    if not res.converged:
        raise MismatchError(
            "could not establish that the selectable vectors cannot cancel the mandatory δ (the bounded "
            "least-squares solve did not converge; the vectors are badly conditioned): refused"
        )
    if res.residual < threshold:
        weights = ", ".join(
            f"{n}={w:+.2f}"
            for n, w in zip(selectable_names or map(str, range(len(res.coefficients))), res.coefficients)
            if abs(w) > 1e-3
        )
        raise MismatchError(
            f"the selectable vectors can cancel {100 * (1 - res.residual):.1f}% of the mandatory δ within the "
            f"coefficient range {list(coeff_range) if coeff_range else '(unbounded)'} "
            f"(residual {res.residual:.3f} < threshold {threshold}; e.g. {weights}): "
            "narrow the range, drop those vectors, or lower the threshold knowingly"
        )
    return res


def apply_guard(logits: np.ndarray, classes: tuple[int, ...]) -> np.ndarray:
    """The output guard on [N, classes] logits (in place): the guarded classes can never be the argmax."""
    if classes:
        logits[:, list(classes)] += np.float32(GUARD_LOGIT)
    return logits
