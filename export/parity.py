"""Parity: what serves, against the PyTorch fp32 reference, on the same images and coefficient rows.

Every backend is built through the runtime's registry with the serving options (precision, fusion,
device) and run through :class:`~forgetrt.runtime.Runtime` (validation, composition and the backend's
own prefix: the BN-folded, cuDNN-fused, CUDA-graph or reduced-precision path a server runs), so parity
checks what ``forgetrt serve`` would answer.

Inputs: synthetic [0, 1] images with a zero coefficient row, one one-hot row per vector and random rows
(every row of the batch differs), and, when given, real images with rows cycling through "no vector"
and each vector. Error is the max absolute logit error relative to the logits' scale (max |reference
logit|), held against one table, :data:`~forgetrt.runtime.backends.TOLERANCES`, keyed by the numeric
mode the backend reports (fp32, tf32, bf16, fp16); top-1 agreement with the reference is reported too.

The reference is the PyTorch classifier in fp32 on CPU when the bundle carries its weights, else (a
grafted bundle) the original ONNX classifier on onnxruntime CPU with the prefix done in NumPy.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from forgetrt.runtime.backends import (
    TOLERANCES,
    backend_names,
    create_backend,
    get_backend,
    make_options,
    resolve_device,
)
from forgetrt.runtime.batcher import BatchingConfig
from forgetrt.runtime.bundle import CLASSIFIER_JSON, CLASSIFIER_ONNX, CLASSIFIER_WEIGHTS, Bundle
from forgetrt.runtime.errors import BackendUnavailableError, InvalidInputError, MismatchError
from forgetrt.runtime.guards import GUARD_LOGIT, apply_guard
from forgetrt.runtime.iospec import IOSpec
from forgetrt.runtime.runtime import Runtime, RuntimeConfig

__all__ = [
    "parity_inputs",
    "onnxruntime_logits",
    "compare_logits",
    "reference_logits",
    "run_parity",
    "format_parity",
]

Reference = Callable[[np.ndarray, np.ndarray], np.ndarray]


def parity_inputs(
    shape: Sequence[int], k: int, seed: int = 0, n_random: int = 4, coeff_range: tuple[float, float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic images with a zero row, one one-hot row per vector and random rows (inside ``coeff_range``)."""
    rng = np.random.default_rng(seed)
    rows = [np.zeros(k)] + [np.eye(k)[i] for i in range(k)] + [rng.uniform(-1, 1, k) for _ in range(n_random)]
    coeffs = np.stack(rows).astype(np.float32)
    if coeff_range is not None:
        coeffs = np.clip(coeffs, *coeff_range).astype(np.float32)
    images = rng.random((len(coeffs), *shape), dtype=np.float32)
    return images, coeffs


def onnxruntime_logits(
    model: bytes | str | os.PathLike, spec: IOSpec, images: np.ndarray, coeffs: np.ndarray
) -> np.ndarray:
    """A fused graph's logits on onnxruntime CPU (the export-time check, before a bundle exists)."""
    import onnxruntime as ort

    src = model if isinstance(model, bytes) else str(model)
    so = ort.SessionOptions()
    so.log_severity_level = 3  # the overridable forget_bank initializer triggers an info-level warning
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run([spec.output_name], {spec.image_name: images, spec.coeffs_name: coeffs})[0]


def compare_logits(
    got: np.ndarray, want: np.ndarray, numerics: str, *, backend: str, raise_on_fail: bool = True
) -> dict[str, Any]:
    """Error of ``got`` against the reference ``want``, judged by ``TOLERANCES[numerics]``."""
    if got.shape != want.shape:
        raise MismatchError(f"{backend} returned logits of shape {got.shape}, the reference {want.shape}")
    tolerance = TOLERANCES[numerics]
    # logits the output guard pushed down are compared by being pushed down, not by value (their scale
    # would swamp every other error)
    live = want > GUARD_LOGIT / 2
    guard_held = bool(np.all(got[~live] < GUARD_LOGIT / 2))
    err = np.where(live, np.abs(got.astype(np.float64) - want), 0.0)
    scale = float(np.abs(want[live]).max()) if live.any() else 1.0
    res = {
        "max_abs": float(err.max()),
        "mean_abs": float(err[live].mean()) if live.any() else 0.0,
        "rel_to_scale": float(err.max() / (scale or 1.0)),
        "numerics": numerics,
        "tolerance": tolerance,
        "top1_agreement": float((got.argmax(1) == want.argmax(1)).mean()),
        "ok": bool(err.max() / (scale or 1.0) <= tolerance and guard_held),
    }
    if not guard_held:
        res["guard_missing"] = True
    if raise_on_fail and not res["ok"]:
        raise MismatchError(
            f"{backend} output differs from the reference: max error {res['max_abs']:.3g} "
            f"({res['rel_to_scale']:.3g} of the logits' scale, tolerance {tolerance:g} for {numerics})"
        )
    return res


def _prefix(
    images: np.ndarray, coeffs: np.ndarray, stacked: np.ndarray, mand: np.ndarray | None, coeff_range
) -> np.ndarray:
    c = coeffs if coeff_range is None else np.clip(coeffs, *coeff_range)
    x = images + (c @ stacked).reshape(images.shape)
    return (x + mand if mand is not None else x).astype(np.float32)


def reference_logits(
    files: Mapping[str, bytes],
    spec: IOSpec,
    stacked: np.ndarray,
    mand: np.ndarray | None,
    coeff_range,
    guard_classes: tuple[int, ...] = (),
    module: Any = None,
) -> Reference:
    """The reference for a bundle's files (see module docstring), with the output guard applied; with
    ``module`` (a PyTorch classifier in hand, e.g. a torch.export program's), that module is the reference."""
    if module is not None or CLASSIFIER_WEIGHTS in files:
        import torch

        from forgetrt.runtime.model_folder import classifier_from_bytes

        model = module
        if model is None:
            model, _ = classifier_from_bytes(files[CLASSIFIER_JSON], files[CLASSIFIER_WEIGHTS])

        def ref(images: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                logits = model(torch.from_numpy(_prefix(images, coeffs, stacked, mand, coeff_range))).numpy()
            return apply_guard(logits, guard_classes).astype(np.float64)

        return ref
    import onnx
    import onnxruntime as ort

    from .onnx_graph import classifier_io

    clf_bytes = files[CLASSIFIER_ONNX]
    clf_in, clf_out = classifier_io(onnx.load_from_string(clf_bytes))
    sess = ort.InferenceSession(clf_bytes, providers=["CPUExecutionProvider"])

    def ref_onnx(images: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
        logits = sess.run([clf_out], {clf_in: _prefix(images, coeffs, stacked, mand, coeff_range)})[0]
        return apply_guard(logits, guard_classes).astype(np.float64)

    return ref_onnx


def _data_rows(n: int, k: int) -> np.ndarray:
    """Row i is "no vector" when i % (K + 1) == 0, else the one-hot of vector i % (K + 1) - 1."""
    rows = np.zeros((n, k), np.float32)
    which = np.arange(n) % (k + 1)
    hit = which > 0
    rows[np.flatnonzero(hit), which[hit] - 1] = 1.0
    return rows


def _run(rt: Runtime, images: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
    step = rt.config.batching.max_batch_size
    return np.concatenate(
        [rt.infer(images[i : i + step], coeffs=coeffs[i : i + step]).logits for i in range(0, len(images), step)]
    )


def run_parity(
    bundle_path: str | os.PathLike,
    backends: Sequence[str] | None = None,
    *,
    device: str = "auto",
    options: Mapping[str, Any] | None = None,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare the serving backends against the reference.

    ``backends=None``: every registered backend, those that cannot run here listed as skipped with the
    reason; a backend asked for by name that cannot run raises :class:`BackendUnavailableError`.
    ``options``: backend name -> its options (dataclass or mapping), as a server would be given them.
    ``images`` (float32 [N, C, H, W] in the input range) and optional ``labels`` add a real-data check.
    """
    bundle = Bundle.load(bundle_path)
    names = list(backends) if backends else list(backend_names())
    for b in [*names, *(options or {})]:
        get_backend(b)  # unknown names fail before any work
    dev = resolve_device(device)
    files = {
        n: bundle.read(n) for n in (CLASSIFIER_WEIGHTS, CLASSIFIER_JSON, CLASSIFIER_ONNX) if n in bundle.manifest.files
    }
    stacked, mand = bundle.vector_arrays()
    ref = reference_logits(files, bundle.iospec, stacked, mand, bundle.coeff_range, bundle.manifest.guard_classes)
    k = len(bundle.vectors)
    syn_x, syn_c = parity_inputs(bundle.iospec.shape, k, seed, coeff_range=bundle.coeff_range)
    sets = {"synthetic": (syn_x, syn_c)}
    if images is not None:
        if images.ndim != 4 or tuple(images.shape[1:]) != tuple(bundle.iospec.shape) or images.dtype != np.float32:
            raise InvalidInputError(
                f"parity images must be float32 [N, {', '.join(map(str, bundle.iospec.shape))}], got {images.dtype} "
                f"{images.shape}"
            )
        if labels is not None and len(labels) != len(images):
            raise InvalidInputError(f"{len(labels)} labels for {len(images)} images")
        rows = _data_rows(len(images), k)
        if bundle.coeff_range is not None:  # a one-hot row outside the bundle's range is clipped into it
            rows = np.clip(rows, *bundle.coeff_range).astype(np.float32)
        sets["data"] = (images, rows)
    want = {name: ref(x, c) for name, (x, c) in sets.items()}
    report: dict[str, Any] = {
        "bundle": str(bundle.path),
        "device": dev,
        "reference": "torch-cpu-fp32" if CLASSIFIER_WEIGHTS in files else "onnxruntime-cpu (original classifier)",
        "rows": {name: len(x) for name, (x, _) in sets.items()},
        "backends": {},
    }
    if labels is not None:
        report["reference_accuracy"] = float((want["data"].argmax(1) == labels).mean() * 100)
    for b in names:
        opts = make_options(b, (options or {}).get(b))
        why = get_backend(b).available(bundle, dev, opts)
        if why is not None:
            if backends:
                raise BackendUnavailableError(f"backend {b!r} cannot run on {dev}: {why}")
            report["backends"][b] = {"status": "skipped", "reason": why}
            continue
        backend = create_backend(b, bundle, dev, opts)
        batching = BatchingConfig(max_batch_size=min(64, backend.max_batch_size or 64))
        entry: dict[str, Any] = {"device": dev, "options": dataclasses.asdict(opts), "described": backend.describe()}
        with Runtime(bundle, [backend], RuntimeConfig(backend=b, device=dev, batching=batching)) as rt:
            for name, (x, c) in sets.items():
                got = _run(rt, x, c)
                entry[name] = compare_logits(got, want[name], backend.numerics, backend=b, raise_on_fail=False)
                if name == "data" and labels is not None:
                    entry[name]["accuracy"] = float((got.argmax(1) == labels).mean() * 100)
        entry["status"] = "ok" if all(entry[name]["ok"] for name in sets) else "mismatch"
        report["backends"][b] = entry
    report["ok"] = all(v["status"] in ("ok", "skipped") for v in report["backends"].values())
    return report


def format_parity(rep: dict[str, Any]) -> str:
    """A human-readable report of :func:`run_parity`."""
    rows = ", ".join(f"{n} {c} rows" for n, c in rep["rows"].items())
    lines = [f"parity of {rep['bundle']} against {rep['reference']} on {rep['device']} ({rows})"]
    if "reference_accuracy" in rep:
        lines.append(f"  reference accuracy on the data rows: {rep['reference_accuracy']:.2f}%")
    for b, v in rep["backends"].items():
        if v["status"] == "skipped":
            lines.append(f"  {b:<12} skipped: {v['reason']}")
            continue
        for name in rep["rows"]:
            r = v[name]
            lines.append(
                f"  {b:<12} {name:<9} {'ok' if r['ok'] else 'MISMATCH':<8} {r['numerics']:<4} max abs "
                f"{r['max_abs']:.2e}  "
                f"{r['rel_to_scale']:.2e} of scale (tol {r['tolerance']:g})  top-1 agreement "
                f"{100 * r['top1_agreement']:.2f}%" + (f"  accuracy {r['accuracy']:.2f}%" if "accuracy" in r else "")
            )
    return "\n".join(lines)
