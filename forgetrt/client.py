"""Vector names to coefficient rows, for a bundle served by something that only takes the raw ``coeffs``
input (Triton Inference Server with ``forgetrt export triton``).

``forgetrt serve`` takes names, weights and policies itself; Triton runs the fused graph as is, so its
clients send one coefficient row per image. :class:`Compositions` builds those rows with the same checks
the runtime makes (known names, no repeats, finite weights, the bundle's coefficient range, policies),
from the bundle itself or from the parameters ``export triton`` records in the model configuration::

    import tritonclient.http as th
    from forgetrt.client import Compositions

    c = th.InferenceServerClient("localhost:8000")
    comp = Compositions.from_model_config(c.get_model_config("digits"))
    coeffs = comp.rows(["forget-3=1,forget-7=0.5", "eu", None])   # [3, K] float32, checked
    # send `coeffs` as the "coeffs" input beside the images

Needs only numpy (no torch, no onnxruntime).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from forgetrt.runtime.compose import BankSnapshot
from forgetrt.runtime.errors import InvalidInputError

__all__ = ["Compositions"]


class Compositions:
    """The vectors, policies and coefficient range of one bundle, and the rows they make."""

    def __init__(
        self,
        vectors: Sequence[str],
        policies: Mapping[str, Mapping[str, float]] | None = None,
        coeff_range: tuple[float, float] | None = None,
        mandatory: Mapping[str, float] | None = None,
    ) -> None:
        names = tuple(vectors)
        if not names:
            raise InvalidInputError("a bundle has at least one selectable vector")
        # the runtime's own composition rules, on a placeholder matrix (only the rows matter here)
        self._snapshot = BankSnapshot(
            0, names, np.zeros((len(names), 1), np.float32), dict(policies or {}), coeff_range, dict(mandatory or {})
        )

    @property
    def vectors(self) -> tuple[str, ...]:
        return self._snapshot.names

    @property
    def policies(self) -> dict[str, dict[str, float]]:
        return {k: dict(v) for k, v in self._snapshot.policies.items()}

    @property
    def coeff_range(self) -> tuple[float, float] | None:
        return self._snapshot.coeff_range

    @property
    def mandatory(self) -> dict[str, float]:
        """Vectors the served graph always applies (not selectable; listed for information)."""
        return dict(self._snapshot.mandatory)

    # ------------------------------------------------------------------ sources
    @classmethod
    def from_bundle(cls, path: str | os.PathLike) -> Compositions:
        """From a bundle folder (loaded and checked as the runtime loads it)."""
        from forgetrt.runtime.bundle import Bundle

        m = Bundle.load(path).manifest
        return cls(m.vectors, m.policies, m.coeff_range, m.mandatory)

    @classmethod
    def from_model_config(cls, config: Mapping[str, Any]) -> Compositions:
        """From a Triton model configuration as JSON (``GET /v2/models/NAME/config``, or
        ``get_model_config(..., as_json=True)["config"]`` over gRPC) of a ``forgetrt export triton`` model."""
        config = config.get("config", config)
        params = config.get("parameters") or {}

        def value(key: str) -> str | None:
            p = params.get(key)
            if p is None:
                return None
            if isinstance(p, Mapping):  # Triton's JSON uses string_value; protobuf's JSON mapping stringValue
                return p.get("string_value", p.get("stringValue", ""))
            return str(p)

        vectors = value("forgetrt_vectors")
        if not vectors:
            raise InvalidInputError(
                "this model configuration has no 'forgetrt_vectors' parameter: is it a `forgetrt export triton` model?"
            )
        cr = value("forgetrt_coeff_range")
        try:
            coeff_range = tuple(float(v) for v in cr.split(",")) if cr else None
            policies = json.loads(value("forgetrt_policies") or "{}")
            mandatory = json.loads(value("forgetrt_mandatory") or "{}")
        except (ValueError, AttributeError) as e:
            raise InvalidInputError(f"malformed forgetrt parameters in the model configuration: {e}") from None
        if coeff_range is not None and len(coeff_range) != 2:
            raise InvalidInputError(f"malformed forgetrt_coeff_range {cr!r}")
        return cls(vectors.split(","), policies, coeff_range, mandatory)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ rows
    def row(self, forget: Any = None) -> np.ndarray:
        """One float32 row [K]: None (no vector), a policy name, ``"forget-3=1,forget-7=0.5"`` or
        ``"forget-3,forget-7"``, a list of names, a name -> weight mapping, or a row to check."""
        if isinstance(forget, str) and forget not in self._snapshot.policies:
            from forgetrt.runtime.service import parse_forget

            forget = parse_forget(forget)
        return np.array(self._snapshot.coeff_row(forget), np.float32)

    def rows(self, compositions: Sequence[Any]) -> np.ndarray:
        """[N, K] float32, one row per image's composition."""
        if isinstance(compositions, (str, Mapping)):
            raise InvalidInputError("rows() takes one composition per image: wrap a single one in a list")
        out = np.zeros((len(compositions), len(self.vectors)), np.float32)
        for i, c in enumerate(compositions):
            out[i] = self.row(c)
        return out
