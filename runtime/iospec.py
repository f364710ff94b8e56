"""IOSpec: the input/output contract shared by training, export, runtime and tests.

Defined once, serialized into every artifact (model.json, bank manifest, bundle manifest), so nobody
spells tensor names, shapes or normalization constants twice.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .errors import CorruptArtifactError, InvalidInputError

__all__ = ["IOSpec"]


@dataclass(frozen=True)
class IOSpec:
    """What a classifier takes and returns.

    Images enter in ``input_range`` pixel space (``[0, 1]``): the forget vector is added there, and the
    model's own first layer applies ``(x - mean) / std``.

    Example::

        spec = IOSpec(shape=(1, 8, 8), mean=(0.5,), std=(0.5,), labels=tuple("0123456789"))
        spec.num_classes  # 10
    """

    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: tuple[str, ...]
    image_name: str = "image"
    coeffs_name: str = "coeffs"
    output_name: str = "logits"
    dtype: str = "float32"
    input_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or any(int(d) <= 0 for d in self.shape):
            raise InvalidInputError(f"IOSpec.shape must be 3 positive ints (C, H, W), got {self.shape!r}")
        c = self.shape[0]
        if len(self.mean) != c or len(self.std) != c:
            raise InvalidInputError(
                f"IOSpec mean/std need one value per channel ({c}), got {len(self.mean)} and {len(self.std)}"
            )
        if any(not (s > 0 and math.isfinite(s)) for s in self.std):
            raise InvalidInputError(f"IOSpec std must be positive and finite, got {self.std!r}")
        if len(self.labels) < 2:
            raise InvalidInputError(f"IOSpec needs at least 2 class labels, got {len(self.labels)}")
        if len(set(self.labels)) != len(self.labels):
            raise InvalidInputError(f"IOSpec labels must be unique, got {self.labels!r}")
        lo, hi = self.input_range
        if not lo < hi:
            raise InvalidInputError(f"IOSpec.input_range must be (lo, hi) with lo < hi, got {self.input_range!r}")
        if self.dtype != "float32":
            raise InvalidInputError(f"IOSpec.dtype: only 'float32' is supported, got {self.dtype!r}")
        names = (self.image_name, self.coeffs_name, self.output_name)
        if len(set(names)) != 3:
            raise InvalidInputError(f"IOSpec tensor names must differ, got {names!r}")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def numel(self) -> int:
        """Elements in one image (C·H·W): the row length of the flattened vector bank."""
        c, h, w = self.shape
        return c * h * w

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["num_classes"] = self.num_classes
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IOSpec:
        try:
            return cls(
                shape=tuple(int(x) for x in d["shape"]),  # type: ignore[arg-type]
                mean=tuple(float(x) for x in d["mean"]),
                std=tuple(float(x) for x in d["std"]),
                labels=tuple(str(x) for x in d["labels"]),
                image_name=str(d.get("image_name", "image")),
                coeffs_name=str(d.get("coeffs_name", "coeffs")),
                output_name=str(d.get("output_name", "logits")),
                dtype=str(d.get("dtype", "float32")),
                input_range=tuple(float(x) for x in d.get("input_range", (0.0, 1.0))),  # type: ignore[arg-type]
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, InvalidInputError):
                raise CorruptArtifactError(f"invalid IOSpec: {e}") from e
            raise CorruptArtifactError(f"invalid IOSpec record {d!r}: {e!r}") from e
