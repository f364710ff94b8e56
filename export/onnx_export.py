"""``forgetrt export onnx``: a trained model folder + its vector bank -> a bundle with a fused ONNX graph,
checked against the PyTorch reference on onnxruntime before it is written."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from forgetrt.runtime.bank import VectorBank
from forgetrt.runtime.bundle import Bundle, write_bundle
from forgetrt.runtime.errors import InvalidInputError, MismatchError, unknown

from .onnx_graph import fuse_classifier
from .torch_onnx import classifier_to_onnx

__all__ = ["export_onnx", "onnxruntime_parity", "parity_inputs"]


def parity_inputs(shape: Sequence[int], k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random [0, 1] images and coefficient rows: a zero row, one-hot rows, and random rows (all differ)."""
    rng = np.random.default_rng(seed)
    rows = [np.zeros(k)] + [np.eye(k)[i] for i in range(k)] + [rng.uniform(-1, 1, k) for _ in range(3)]
    coeffs = np.stack(rows).astype(np.float32)
    images = rng.random((len(coeffs), *shape), dtype=np.float32)
    return images, coeffs


def onnxruntime_parity(onnx_bytes: bytes, reference, images: np.ndarray, coeffs: np.ndarray, iospec) -> dict[str, float]:
    """Max/mean absolute error of onnxruntime (CPU) against ``reference(images, coeffs)``, and the error
    relative to the logits' scale (max |logit|)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    got = sess.run([iospec.output_name], {iospec.image_name: images, iospec.coeffs_name: coeffs})[0]
    want = reference(images, coeffs)
    err = np.abs(got - want)
    scale = float(np.abs(want).max()) or 1.0
    return {"max_abs": float(err.max()), "mean_abs": float(err.mean()), "rel_to_scale": float(err.max() / scale)}


def export_onnx(
    model_dir: str | os.PathLike,
    bank_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    vectors: Sequence[str] | None = None,
    mandatory: Mapping[str, float] | None = None,
    coeff_range: tuple[float, float] | None = None,
    opset: int = 17,
    tolerance: float = 1e-4,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export the fused graph into a bundle folder; fails (writing nothing) if parity exceeds ``tolerance``."""
    import torch

    from forgetrt.train.models import load_model

    model, info = load_model(model_dir, "cpu")
    bank = VectorBank.load(bank_dir)
    bank.check_model(info.fingerprint, info.iospec, what=f"model {info.path}")
    mandatory = dict(mandatory or {})
    names = list(vectors) if vectors else [n for n in bank.names if n not in mandatory]
    for n in [*names, *mandatory]:
        if n not in bank:
            raise unknown("vector", n, bank.names)
    both = sorted(set(names) & set(mandatory))
    if both:
        # refused: a request could cancel a mandatory vector with a negative coefficient on its selectable copy
        raise InvalidInputError(f"vectors {both} are both mandatory and selectable; a mandatory vector cannot be selectable")
    if not names:
        raise InvalidInputError("no selectable vector left to export")
    if len(set(names)) != len(names):
        raise InvalidInputError(f"vector names repeat: {names}")
    spec = info.iospec
    stacked = bank.stack(names)
    mand = bank.combine(mandatory) if mandatory else None
    bundle_id = uuid.uuid4().hex[:12]
    fused = fuse_classifier(
        classifier_to_onnx(model, spec, opset), spec, stacked, vector_names=names, mandatory=mand, coeff_range=coeff_range,
        metadata={"forgetrt.bundle_id": bundle_id, "forgetrt.model_fingerprint": info.fingerprint},
    )
    data = fused.SerializeToString()

    def reference(images: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
        c = coeffs if coeff_range is None else np.clip(coeffs, *coeff_range)
        delta = (c @ stacked).reshape(len(images), *spec.shape) + (0 if mand is None else mand)
        with torch.no_grad():
            return model(torch.from_numpy((images + delta).astype(np.float32))).numpy()

    parity = onnxruntime_parity(data, reference, *parity_inputs(spec.shape, len(names)), spec)
    if parity["rel_to_scale"] > tolerance:
        raise MismatchError(f"onnxruntime output differs from PyTorch: max error {parity['max_abs']:.3g} "
                            f"({parity['rel_to_scale']:.3g} of the logits' scale, tolerance {tolerance:g}); bundle not written")
    record = {
        "bundle_id": bundle_id,
        "iospec": spec.to_dict(),
        "arch": info.arch,
        "model_fingerprint": info.fingerprint,
        "vectors": names,
        "mandatory": mandatory,
        "coeff_range": list(coeff_range) if coeff_range else None,
        "opset": opset,
        "bank_entries": {n: bank.entry(n) for n in [*names, *mandatory]},
        "parity": {"onnxruntime": parity},
    }
    bundle: Bundle = write_bundle(out, {"model.onnx": data}, record, overwrite=overwrite)
    return {"bundle": str(bundle.path), "bundle_id": bundle_id, "vectors": names, "mandatory": mandatory, "parity": parity}
