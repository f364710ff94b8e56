"""Image files to the model's input: float32 [N, C, H, W] pixels in [0, 1].

PNG/JPEG (and anything else Pillow reads) are converted to the IOSpec's channel count and resized to
its height and width; ``.npy`` files hold float32 [C, H, W] or [N, C, H, W] arrays already in the
input space (no pickle). Pillow is imported only when an encoded image is read.

Example::

    x = load_images(["cat.png", "batch.npy"], runtime.iospec)
    result = runtime.infer(x, forget=["forget-3"])
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .errors import InvalidInputError
from .iospec import IOSpec

__all__ = ["load_images"]


def _npy(path: str, spec: IOSpec) -> np.ndarray:
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InvalidInputError(f"cannot read {path}: {str(e) or type(e).__name__}") from None
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or tuple(a.shape[1:]) != tuple(spec.shape):
        raise InvalidInputError(
            f"{path} holds an array of shape {list(a.shape)}; expected [C, H, W] or [N, C, H, W] with C, H, W = "
            f"{list(spec.shape)}"
        )
    if not np.issubdtype(a.dtype, np.floating):
        raise InvalidInputError(f"{path} holds {a.dtype}; expected floating-point pixels in the model's input space")
    return a.astype(np.float32)


def _encoded(path: str, spec: IOSpec) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    c, h, w = spec.shape
    if c not in (1, 3):
        raise InvalidInputError(f"{path}: image files give 1 or 3 channels; this model takes {c} (pass a .npy array)")
    try:
        with Image.open(path) as im:
            im = im.convert("L" if c == 1 else "RGB").resize((w, h))
            a = np.asarray(im, np.float32) / 255.0
    except (OSError, UnidentifiedImageError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise InvalidInputError(f"cannot read image {path}: {str(e) or type(e).__name__}") from None
    lo, hi = spec.input_range
    a = lo + a * (hi - lo)
    return (a[None] if c == 1 else a.transpose(2, 0, 1))[None].astype(np.float32)


def load_images(paths: Sequence[str | os.PathLike], spec: IOSpec) -> np.ndarray:
    """Read image files (see the module docstring) into one float32 batch [N, C, H, W]."""
    if not paths:
        raise InvalidInputError("no image given")
    arrays = [(_npy if str(p).lower().endswith(".npy") else _encoded)(str(p), spec) for p in paths]
    return np.concatenate(arrays).astype(np.float32, copy=False)
