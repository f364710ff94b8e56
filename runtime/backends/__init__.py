"""Backend registry: one module per backend behind :class:`Backend`; heavy libraries are imported only
when a backend is created. ``auto`` picks the fastest available backend for the device and says
which; a backend asked for by name that cannot run raises, it never falls back silently."""

from __future__ import annotations

import ctypes
import importlib.util
import inspect
import logging
from collections.abc import Callable

from ..bundle import Bundle
from ..errors import BackendUnavailableError, InvalidInputError, unknown
from .base import Backend

__all__ = ["Backend", "BACKENDS", "DEVICES", "create_backend", "resolve_device", "availability", "cuda_device_count"]

log = logging.getLogger("forgetrt.runtime")

BACKENDS = ("onnxruntime", "tensorrt", "torch")
DEVICES = ("auto", "cpu", "cuda")


def cuda_device_count() -> int:
    """CUDA devices visible through the driver API (no torch import)."""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
        except OSError:
            continue
        n = ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(n)) != 0:
            return 0
        return n.value
    return 0


def resolve_device(device: str) -> str:
    if device not in DEVICES:
        raise unknown("device", device, DEVICES)
    if device == "auto":
        return "cuda" if cuda_device_count() > 0 else "cpu"
    if device == "cuda" and cuda_device_count() == 0:
        raise BackendUnavailableError("device 'cuda' requested but no CUDA device is visible")
    return device


def availability(name: str, bundle: Bundle, device: str) -> str | None:
    """None if backend ``name`` can run ``bundle`` on ``device`` here, else why not (cheap: no heavy imports)."""
    if name == "onnxruntime":
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed"
        if device == "cuda":
            from .onnxruntime_backend import ort_cuda_available

            return None if ort_cuda_available() else "onnxruntime has no CUDAExecutionProvider (install 'forgetrt[gpu]')"
        return None
    if name == "torch":
        if importlib.util.find_spec("torch") is None:
            return "torch is not installed"
        return None if bundle.has_torch_classifier else "the bundle was grafted onto an ONNX classifier: no PyTorch weights"
    if name == "tensorrt":
        if device != "cuda":
            return "TensorRT runs on CUDA devices only"
        if importlib.util.find_spec("tensorrt") is None:
            return "TensorRT is not installed"
        return None if bundle.plan_path.is_file() else "the bundle has no model.plan (forgetrt export trt)"
    raise unknown("backend", name, BACKENDS)


# fastest first, per device: TensorRT, then CUDA-graph replay, then onnxruntime's CUDA EP; on CPU onnxruntime beats eager torch
_PREFERENCE = {"cuda": ("tensorrt", "torch", "onnxruntime"), "cpu": ("onnxruntime", "torch")}


def _factory(name: str) -> Callable[..., Backend]:
    if name == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend
    if name == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend
    from .tensorrt_backend import TensorRTBackend

    return TensorRTBackend


def _construct(name: str, bundle: Bundle, device: str, options: dict) -> Backend:
    factory = _factory(name)
    params = inspect.signature(factory.__init__).parameters
    valid = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    bad = sorted(set(options) - set(valid))
    if bad:
        raise InvalidInputError(f"backend {name!r} takes no option {', '.join(map(repr, bad))} (its options: {', '.join(valid) or 'none'}); "
                                "options are backend-specific, so name the backend")
    return factory(bundle, device, **options)


def create_backend(name: str, bundle: Bundle, device: str = "auto", **options) -> Backend:
    """Create a backend; ``name="auto"`` picks the fastest available one and logs the choice. ``options``
    go to the backend's constructor (keyword-only there); one it does not take is an InvalidInputError."""
    device = resolve_device(device)
    if name == "auto":
        reasons = {}
        for cand in _PREFERENCE[device]:
            why = availability(cand, bundle, device)
            if why is None:
                log.info("backend auto: chose %s on %s", cand, device)
                return _construct(cand, bundle, device, options)
            reasons[cand] = why
        raise BackendUnavailableError(f"no backend can run this bundle on {device}: {reasons}")
    if name not in BACKENDS:
        raise unknown("backend", name, (*BACKENDS, "auto"))
    why = availability(name, bundle, device)
    if why is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run on {device}: {why}")
    return _construct(name, bundle, device, options)
