"""The one small interface every backend implements (after Polygraphy's runners): the base class checks
shapes and batch limits, so each backend only writes ``_infer``."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..bundle import Bundle
from ..compose import BankState
from ..errors import InvalidInputError

__all__ = ["Backend"]


class Backend(ABC):
    """Runs ``logits = classifier(image + coeffs @ bank + mandatory)`` for one batch."""

    name: str = "?"
    #: whether ``run`` may be called from several threads at once
    thread_safe: bool = False

    def __init__(self, bundle: Bundle, device: str) -> None:
        self.bundle = bundle
        self.spec = bundle.iospec
        self.device = device
        self.max_batch: int | None = None  # None: no engine limit
        self._shape = tuple(self.spec.shape)

    def run(self, images: np.ndarray, coeffs: np.ndarray, bank: BankState) -> np.ndarray:
        n = images.shape[0]
        if images.shape[1:] != self._shape or images.dtype != np.float32:
            raise InvalidInputError(f"{self.name}: images must be float32 [N, {', '.join(map(str, self.spec.shape))}], got {images.dtype} {images.shape}")
        if coeffs.shape != (n, bank.k) or coeffs.dtype != np.float32:
            raise InvalidInputError(f"{self.name}: coeffs must be float32 [{n}, {bank.k}], got {coeffs.dtype} {coeffs.shape}")
        if self.max_batch is not None and n > self.max_batch:
            raise InvalidInputError(f"batch of {n} images exceeds the {self.name} engine's maximum {self.max_batch}")
        if not images.flags.c_contiguous:
            images = np.ascontiguousarray(images)
        if not coeffs.flags.c_contiguous:
            coeffs = np.ascontiguousarray(coeffs)
        out = self._infer(images, coeffs, bank)
        if out.shape != (n, self.spec.num_classes):
            raise RuntimeError(f"{self.name} returned logits {out.shape}, expected ({n}, {self.spec.num_classes})")
        return out

    @abstractmethod
    def _infer(self, images: np.ndarray, coeffs: np.ndarray, bank: BankState) -> np.ndarray:
        """Logits [N, classes] as an array the caller owns: the batcher hands results over while the
        next batch already runs, so a reused output buffer must be copied out."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release engine resources."""

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.device, "max_batch": self.max_batch}
