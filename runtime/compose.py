"""Per-request composition: turning the vectors a request asks to apply (its *composition*, the
``forget`` argument) into one coefficient row.

Words: the *vector bank* (:class:`~forgetrt.runtime.bank.VectorBank`) is the folder of trained vectors;
a :class:`BankSnapshot` is one immutable version of what the engine serves; its ``matrix`` is the
[K, C·H·W] array; a *forget spec* (``forgetrt.train.data.ForgetSpec``) names training data to unlearn.

A snapshot holds the selectable vectors in coefficient order (as a [K, C·H·W] matrix), the named
policies, the coefficient range and a version number. Requests resolve against the snapshot current
when they arrive; a hot swap installs a new snapshot and never mutates an old one, so in-flight
requests finish on the bank they started with.

A composition (``forget``) is one of:

- ``None`` / ``[]``: no selectable vector (mandatory vectors baked into the engine still apply)
- a list of names: weight 1 each, e.g. ``["forget-3", "forget-7"]``
- a mapping name -> weight, e.g. ``{"forget-3": 1.0, "forget-7": 0.5}``
- a policy name stored in the bundle, e.g. ``"eu"``
- a raw coefficient row of length K (a list of numbers or a 1-D array)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from .errors import InvalidInputError, unknown

__all__ = ["BankSnapshot", "Composition"]

_F32_MAX = float(np.finfo(np.float32).max)

Composition = Union[None, str, Sequence[str], Mapping[str, float], Sequence[float], np.ndarray]


@dataclass(frozen=True, eq=False)
class BankSnapshot:
    version: int
    names: tuple[str, ...]
    matrix: np.ndarray  # float32 [K, C·H·W], read-only
    policies: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    coeff_range: tuple[float, float] | None = None
    mandatory: Mapping[str, float] = field(default_factory=dict)
    label: str = ""  # human-readable id of the bank's source (bundle id or bank path)
    #: the version at which ``matrix`` last changed (a policy change makes a new version, same matrix):
    #: what engines key their copy of the bank on; -1 means ``version``
    matrix_version: int = -1

    def __post_init__(self) -> None:
        m = np.ascontiguousarray(self.matrix, np.float32)
        if m.ndim != 2 or m.shape[0] != len(self.names):
            raise InvalidInputError(f"bank matrix {m.shape} does not match {len(self.names)} names")
        if not np.all(np.isfinite(m)):
            raise InvalidInputError("bank contains NaN or Inf")
        if len(set(self.names)) != len(self.names):
            raise InvalidInputError(f"bank names repeat: {self.names}")
        m.setflags(write=False)
        object.__setattr__(self, "matrix", m)
        if self.matrix_version < 0:
            object.__setattr__(self, "matrix_version", self.version)
        object.__setattr__(self, "_index", {n: i for i, n in enumerate(self.names)})
        object.__setattr__(self, "_cache", {})
        for pname, weights in self.policies.items():
            for n in weights:
                if n not in self._index:  # type: ignore[attr-defined]
                    raise unknown(f"vector in policy {pname!r}:", n, self.names)

    @property
    def k(self) -> int:
        return len(self.names)

    def coeff_row(self, forget: Composition) -> np.ndarray:
        """One float32 coefficient row [K] for a request's ``forget`` spec (validated; read-only).

        Rows of named requests (a policy, a list of names) are cached per snapshot: the common case of
        many requests asking for the same composition costs a dict lookup.
        """
        t = type(forget)
        key = (
            forget
            if t is str
            else tuple(forget)
            if t is list and forget and all(type(n) is str for n in forget)
            else None
        )
        if key is not None:
            cached = self._cache.get(key)  # type: ignore[attr-defined]
            if cached is not None:
                return cached
        row = self._row(forget)
        row.setflags(write=False)
        if key is not None and len(self._cache) < 4096:  # type: ignore[attr-defined]
            self._cache[key] = row  # type: ignore[attr-defined]
        return row

    def _row(self, forget: Composition) -> np.ndarray:
        row = np.zeros(self.k, np.float32)
        if forget is None:
            return row
        if isinstance(forget, str):
            if forget not in self.policies:
                if forget in self._index:  # type: ignore[attr-defined]
                    raise InvalidInputError(
                        f"{forget!r} is a vector, not a policy: pass [{forget!r}] or {{{forget!r}: 1.0}}"
                    )
                raise unknown("policy", forget, self.policies)
            forget = self.policies[forget]
        if isinstance(forget, Mapping):
            items = list(forget.items())
        elif isinstance(forget, np.ndarray) or (
            isinstance(forget, Sequence) and forget and not isinstance(forget[0], str)
        ):
            arr = np.asarray(forget, dtype=np.float64)
            if arr.ndim != 1 or arr.shape[0] != self.k:
                raise InvalidInputError(
                    f"a raw coefficient row must have K={self.k} entries (vectors {list(self.names)}), got shape "
                    f"{arr.shape}"
                )
            items = list(zip(self.names, arr.tolist()))
        elif isinstance(forget, Sequence):
            if len(set(forget)) != len(forget):
                raise InvalidInputError(f"vector names repeat in {list(forget)}")
            items = [(n, 1.0) for n in forget]
        else:
            raise InvalidInputError(
                "forget must be a list of names, a name->weight mapping, a policy name or a coefficient row; got "
                f"{type(forget).__name__}"
            )
        for name, w in items:
            if not isinstance(name, str) or name not in self._index:  # type: ignore[attr-defined]
                raise unknown("vector", name, self.names)
            try:
                w = float(w)
            except OverflowError:
                raise InvalidInputError(
                    f"weight for {name!r} must be a finite float32; got an integer too large"
                ) from None
            except (TypeError, ValueError):
                raise InvalidInputError(f"weight for {name!r} must be a number, got {type(w).__name__}") from None
            if not math.isfinite(w) or abs(w) > _F32_MAX:
                raise InvalidInputError(f"weight for {name!r} must be a finite float32, got {w}")
            if self.coeff_range is not None and not (self.coeff_range[0] <= w <= self.coeff_range[1]):
                raise InvalidInputError(
                    f"weight {w} for {name!r} is outside the bundle's coefficient range {list(self.coeff_range)}"
                )
            row[self._index[name]] = w  # type: ignore[attr-defined]
        return row

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "vectors": list(self.names),
            "policies": {k: dict(v) for k, v in self.policies.items()},
            "mandatory": dict(self.mandatory),
            "matrix_version": self.matrix_version,
            "coeff_range": list(self.coeff_range) if self.coeff_range else None,
            "label": self.label,
        }
