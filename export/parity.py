"""Parity: every backend's logits against the PyTorch reference, on the same images and coefficient rows.

Inputs: random [0, 1] images with a zero coefficient row, one one-hot row per vector and random rows
(so every row of the batch differs). Error is reported as max and mean absolute error and as max
error relative to the logits' scale (max |reference logit|). Tolerances: fp32 1e-4 of that scale;
PyTorch on CUDA with TF32 convolutions (PyTorch's default there) 2e-3; fp16 engines 2e-2.

The reference is the PyTorch classifier in fp32 on CPU when the bundle carries its weights, else
(a grafted bundle) the original ONNX classifier on onnxruntime CPU with the prefix done in NumPy.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from forgetrt.runtime.bundle import CLASSIFIER_JSON, CLASSIFIER_ONNX, CLASSIFIER_WEIGHTS, Bundle
from forgetrt.runtime.errors import BackendUnavailableError, MismatchError, unknown
from forgetrt.runtime.iospec import IOSpec

__all__ = [
    "FP32_TOLERANCE",
    "FP16_TOLERANCE",
    "TF32_TOLERANCE",
    "PARITY_BACKENDS",
    "parity_inputs",
    "onnxruntime_logits",
    "check_parity",
    "reference_logits",
    "run_parity",
    "format_parity",
]

FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 2e-2
TF32_TOLERANCE = 2e-3  # 10-bit mantissa inputs, fp32 accumulation: measured 1.5e-4 on resnet18-cifar (H200)
PARITY_BACKENDS = ("onnxruntime", "torch", "tensorrt")

Reference = Callable[[np.ndarray, np.ndarray], np.ndarray]


def parity_inputs(shape: Sequence[int], k: int, seed: int = 0, n_random: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = [np.zeros(k)] + [np.eye(k)[i] for i in range(k)] + [rng.uniform(-1, 1, k) for _ in range(n_random)]
    coeffs = np.stack(rows).astype(np.float32)
    images = rng.random((len(coeffs), *shape), dtype=np.float32)
    return images, coeffs


def onnxruntime_logits(model: bytes | str | os.PathLike, spec: IOSpec, images: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    src = model if isinstance(model, bytes) else str(model)
    so = ort.SessionOptions()
    so.log_severity_level = 3  # the overridable forget_bank initializer triggers an info-level warning
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run([spec.output_name], {spec.image_name: images, spec.coeffs_name: coeffs})[0]


def check_parity(got: np.ndarray, want: np.ndarray, tolerance: float, *, backend: str, raise_on_fail: bool = True) -> dict[str, Any]:
    if got.shape != want.shape:
        raise MismatchError(f"{backend} returned logits of shape {got.shape}, the reference {want.shape}")
    err = np.abs(got.astype(np.float64) - want)
    scale = float(np.abs(want).max()) or 1.0
    res = {"max_abs": float(err.max()), "mean_abs": float(err.mean()), "rel_to_scale": float(err.max() / scale),
           "tolerance": tolerance, "ok": bool(err.max() / scale <= tolerance)}
    if raise_on_fail and not res["ok"]:
        raise MismatchError(
            f"{backend} output differs from the reference: max error {res['max_abs']:.3g} "
            f"({res['rel_to_scale']:.3g} of the logits' scale, tolerance {tolerance:g})"
        )
    return res


def _prefix(images: np.ndarray, coeffs: np.ndarray, stacked: np.ndarray, mand: np.ndarray | None, coeff_range) -> np.ndarray:
    c = coeffs if coeff_range is None else np.clip(coeffs, *coeff_range)
    x = images + (c @ stacked).reshape(images.shape)
    return (x + mand if mand is not None else x).astype(np.float32)


def _torch_classifier(files: Mapping[str, bytes], device: str = "cpu"):
    from forgetrt.runtime.backends.torch_backend import classifier_from_bytes

    return classifier_from_bytes(files[CLASSIFIER_JSON], files[CLASSIFIER_WEIGHTS]).to(device)


def reference_logits(files: Mapping[str, bytes], spec: IOSpec, stacked: np.ndarray, mand: np.ndarray | None, coeff_range) -> Reference:
    """The reference for a bundle's files (see module docstring)."""
    if CLASSIFIER_WEIGHTS in files:
        import torch

        model = _torch_classifier(files)

        def ref(images: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model(torch.from_numpy(_prefix(images, coeffs, stacked, mand, coeff_range))).double().numpy()

        return ref
    import onnxruntime as ort

    from .onnx_graph import classifier_io

    import onnx

    clf_bytes = files[CLASSIFIER_ONNX]
    clf_in, clf_out = classifier_io(onnx.load_from_string(clf_bytes))
    sess = ort.InferenceSession(clf_bytes, providers=["CPUExecutionProvider"])

    def ref_onnx(images: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
        return sess.run([clf_out], {clf_in: _prefix(images, coeffs, stacked, mand, coeff_range)})[0].astype(np.float64)

    return ref_onnx


def _available(backend: str, bundle: Bundle) -> str | None:
    """None if ``backend`` can run parity for this bundle here, else the reason it cannot."""
    if backend == "onnxruntime":
        return None if importlib.util.find_spec("onnxruntime") else "onnxruntime is not installed"
    if backend == "torch":
        if importlib.util.find_spec("torch") is None:
            return "torch is not installed"
        return None if bundle.has_torch_classifier else "bundle was grafted onto an ONNX classifier: no PyTorch weights"
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install 'forgetrt[trt]' from NVIDIA's index)"
    if not bundle.plan_path.is_file():
        return f"bundle has no {bundle.plan_path.name}: run `forgetrt export trt --bundle {bundle.path}` first"
    import torch

    return None if torch.cuda.is_available() else "TensorRT needs a CUDA device"


def run_parity(bundle_path: str | os.PathLike, backends: Sequence[str] | None = None, *, seed: int = 0) -> dict[str, Any]:
    """Compare backends against the reference. ``backends=None``: every available one, the others listed
    as skipped with their reason; a backend asked for by name that cannot run raises BackendUnavailableError."""
    bundle = Bundle.load(bundle_path)
    for b in backends or ():
        if b not in PARITY_BACKENDS:
            raise unknown("backend", b, PARITY_BACKENDS)
    files = {name: (bundle.path / name).read_bytes() for name in bundle.record["files"] if name in (CLASSIFIER_WEIGHTS, CLASSIFIER_JSON, CLASSIFIER_ONNX)}
    stacked, mand = bundle.vector_arrays()
    ref = reference_logits(files, bundle.iospec, stacked, mand, bundle.coeff_range)
    images, coeffs = parity_inputs(bundle.iospec.shape, len(bundle.vectors), seed)
    want = ref(images, coeffs)
    report: dict[str, Any] = {"bundle": str(bundle.path), "reference": "torch-cpu-fp32" if CLASSIFIER_WEIGHTS in files else "onnxruntime-cpu (original classifier)", "rows": len(coeffs), "backends": {}}
    for b in backends or PARITY_BACKENDS:
        reason = _available(b, bundle)
        if reason:
            if backends:
                raise BackendUnavailableError(f"backend {b!r} cannot run here: {reason}")
            report["backends"][b] = {"status": "skipped", "reason": reason}
            continue
        tol = FP32_TOLERANCE
        if b == "onnxruntime":
            got, device = onnxruntime_logits(bundle.onnx_path, bundle.iospec, images, coeffs), "cpu"
        elif b == "torch":
            got, device = _torch_fused(files, images, coeffs, stacked, mand, bundle.coeff_range)
            if device == "cuda" and _torch_tf32():
                tol = TF32_TOLERANCE
        else:
            from forgetrt.runtime.backends.tensorrt_backend import TensorRTRunner

            runner = TensorRTRunner(bundle.plan_path, bundle.iospec)
            got, device = runner.infer(images, coeffs), "cuda"
            if bundle.record.get("tensorrt", {}).get("fp16"):
                tol = FP16_TOLERANCE
        res = check_parity(got, want, tol, backend=b, raise_on_fail=False)
        report["backends"][b] = {"status": "ok" if res["ok"] else "mismatch", "device": device, **res}
    report["ok"] = all(v["status"] in ("ok", "skipped") for v in report["backends"].values())
    return report


def _torch_tf32() -> bool:
    import torch

    return bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)


def _torch_fused(files, images, coeffs, stacked, mand, coeff_range) -> tuple[np.ndarray, str]:
    """The same fused computation in PyTorch, on CUDA when available (else CPU, where it equals the reference)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _torch_classifier(files, device)
    c = torch.from_numpy(coeffs).to(device)
    if coeff_range is not None:
        c = c.clamp(*coeff_range)
    x = torch.from_numpy(images).to(device) + (c @ torch.from_numpy(stacked).to(device)).view(images.shape)
    if mand is not None:
        x = x + torch.from_numpy(mand).to(device)
    with torch.no_grad():
        return model(x).float().cpu().numpy(), device


def format_parity(rep: dict[str, Any]) -> str:
    """A human-readable report of :func:`run_parity`."""
    lines = [f"parity of {rep['bundle']} against {rep['reference']} ({rep['rows']} rows: zero, one-hot, random)"]
    for b, v in rep["backends"].items():
        if v["status"] == "skipped":
            lines.append(f"  {b:<12} skipped: {v['reason']}")
        else:
            lines.append(f"  {b:<12} {v['status']:<8} {v['device']:<5} max abs {v['max_abs']:.2e}  mean abs {v['mean_abs']:.2e}  "
                         f"{v['rel_to_scale']:.2e} of scale (tol {v['tolerance']:g})")
    return "\n".join(lines)
