"""The one small interface every backend implements (after Polygraphy's runners), and its registry entry.

The base class owns what every backend must get right the same way: input checks, the engine's batch
limit, the call lock of a backend that is not thread-safe, and errors (an engine failure or a wrong
output shape is an :class:`EngineError`, never a bare exception). A backend writes ``_infer`` and,
where its engine cannot serve every bank, ``check_bank``.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..compose import BankSnapshot
from ..errors import EngineError, ForgetRTError, InvalidInputError, MismatchError

__all__ = ["Backend", "BackendEntry", "NoOptions", "TOLERANCES"]

#: The largest logit error a backend may show against the PyTorch fp32 reference, relative to the
#: logits' scale (max |reference logit|), per numeric mode. The one tolerance table: parity, the
#: export-time check and the torch backend's self-check of its fused kernels all read it.
#: tf32 (CUDA convolutions with 10-bit mantissa inputs, PyTorch's and onnxruntime's CUDA default):
#: measured 1.5e-4 on resnet18-cifar (H200); fp16 measured 5.2e-4 and bf16 4.5e-3 there.
TOLERANCES: dict[str, float] = {"fp32": 1e-4, "tf32": 2e-3, "fp16": 2e-2, "bf16": 5e-2}


@dataclass(frozen=True)
class NoOptions:
    """A backend without options."""


class Backend(ABC):
    """Runs ``logits = classifier(image + coeffs @ bank + mandatory)`` for one batch."""

    name: str = "?"
    #: whether ``_infer`` may run on several threads at once; if not, :meth:`run` serializes calls
    thread_safe: bool = False

    def __init__(self, bundle: Bundle, device: str) -> None:
        self.bundle = bundle
        self.spec = bundle.iospec
        self.device = device
        self.max_batch_size: int | None = None  # None: no engine limit
        self._shape = tuple(self.spec.shape)
        self._numel = self.spec.numel
        self._lock = threading.Lock()

    @property
    def numerics(self) -> str:
        """The numeric mode this backend computes in: a key of :data:`TOLERANCES`."""
        return "fp32"

    def run(self, images: np.ndarray, coeffs: np.ndarray, snapshot: BankSnapshot) -> np.ndarray:
        n = images.shape[0]
        if images.shape[1:] != self._shape or images.dtype != np.float32:
            raise InvalidInputError(
                f"{self.name}: images must be float32 [N, {', '.join(map(str, self.spec.shape))}], got {images.dtype} "
                f"{images.shape}"
            )
        if coeffs.shape != (n, snapshot.k) or coeffs.dtype != np.float32:
            raise InvalidInputError(
                f"{self.name}: coeffs must be float32 [{n}, {snapshot.k}], got {coeffs.dtype} {coeffs.shape}"
            )
        if self.max_batch_size is not None and n > self.max_batch_size:
            raise InvalidInputError(
                f"batch of {n} images exceeds the {self.name} engine's maximum {self.max_batch_size}"
            )
        if not images.flags.c_contiguous:
            images = np.ascontiguousarray(images)
        if not coeffs.flags.c_contiguous:
            coeffs = np.ascontiguousarray(coeffs)
        try:
            if self.thread_safe:
                out = self._infer(images, coeffs, snapshot)
            else:
                with self._lock:
                    out = self._infer(images, coeffs, snapshot)
        except ForgetRTError:
            raise
        except Exception as e:  # noqa: BLE001 - the engine's own exceptions have no common base
            raise EngineError(f"the {self.name} backend failed on a batch of {n} images: {e!r}") from e
        if out.shape != (n, self.spec.num_classes):
            raise EngineError(
                f"the {self.name} backend returned logits {out.shape}, expected ({n}, {self.spec.num_classes})"
            )
        return out

    def check_bank(self, snapshot: BankSnapshot) -> None:
        """Raise :class:`MismatchError` if this engine cannot serve ``bank``. The runtime calls it on every
        backend before it publishes a hot swap, so a refused bank never reaches a request."""
        if snapshot.matrix.shape[1] != self._numel:
            raise MismatchError(
                f"{self.name}: bank rows have {snapshot.matrix.shape[1]} values, the model's input has {self._numel}"
            )

    @abstractmethod
    def _infer(self, images: np.ndarray, coeffs: np.ndarray, snapshot: BankSnapshot) -> np.ndarray:
        """Logits [N, classes] as an array the caller owns: the batcher hands results over while the
        next batch already runs, so a reused output buffer must be copied out."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release engine resources."""

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "device": self.device,
            "max_batch_size": self.max_batch_size,
            "numerics": self.numerics,
        }


@dataclass(frozen=True)
class BackendEntry:
    """One backend in the registry.

    ``factory(bundle, device, options)`` builds it (importing its heavy library only then);
    ``available(bundle, device, options)`` says, without building it, why it cannot run (None if it
    can) and checks exactly what construction needs; ``rank`` orders the candidates of ``auto`` per device
    (higher first; a device it lacks is never chosen automatically); ``options`` is a frozen
    dataclass whose fields with a ``help`` text are the backend's user options.
    """

    name: str
    factory: Callable[[Bundle, str, Any], Backend]
    available: Callable[[Bundle, str, Any], str | None]
    options: type = NoOptions
    rank: Mapping[str, int] = field(default_factory=dict)
    description: str = ""
