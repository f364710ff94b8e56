"""TensorRT backend: runs the bundle's ``model.plan`` (TensorRT 10 API, imported lazily).

Named tensors, ``set_input_shape`` per call, ``execute_async_v3`` on a private stream, device buffers
allocated through PyTorch (no pycuda dependency). The bank is a constant inside the engine: a hot swap
with the same K is a refit of a ``--refittable`` engine; any other bank change needs a rebuild.

Never run on a real TensorRT: it cannot be installed where this was written (its tests skip).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..compose import BankSnapshot
from ..errors import BackendUnavailableError, CorruptArtifactError, EngineError, MismatchError
from ..iospec import IOSpec
from .base import Backend, BackendEntry, NoOptions

__all__ = ["TensorRTRunner", "TensorRTBackend", "import_tensorrt"]


def _available(bundle: Bundle, device: str, options: NoOptions) -> str | None:
    """What construction needs: a CUDA device, TensorRT, torch (it allocates the device buffers) with
    CUDA, and the bundle's model.plan."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install 'forgetrt[trt]' from NVIDIA's index)"
    if device != "cuda":
        return "TensorRT runs on CUDA devices only"
    if importlib.util.find_spec("torch") is None:
        return "the TensorRT runner allocates device memory through torch, which is not installed"
    if not bundle.has_plan:
        return f"the bundle has no model.plan (run `forgetrt export trt --bundle {bundle.path}`)"
    import torch

    if not torch.cuda.is_available():
        return "this torch build sees no CUDA device"
    return None


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailableError(
            "TensorRT is not installed: it comes only from NVIDIA's package index "
            "(pip install --extra-index-url https://pypi.nvidia.com 'forgetrt[trt]') and needs a CUDA GPU"
        ) from e
    return trt


class TensorRTRunner:
    """Runs a serialized engine: named tensors, one profile, torch-allocated device buffers."""

    def __init__(self, plan_path: str | os.PathLike, spec: IOSpec) -> None:
        trt = import_tensorrt()
        try:
            import torch
        except ImportError as e:
            raise BackendUnavailableError(
                "the TensorRT runner allocates device memory through torch, which is not installed"
            ) from e
        if not torch.cuda.is_available():
            raise BackendUnavailableError("TensorRT needs a CUDA device; none is available")
        self._torch = torch
        self._trt = trt
        self.spec = spec
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise CorruptArtifactError(
                f"TensorRT could not deserialize {plan_path} (built by another TensorRT version or GPU?)"
            )
        self.context = self.engine.create_execution_context()
        lo, _opt, hi = self.engine.get_tensor_profile_shape(spec.image_name, 0)
        self.min_batch_size, self.max_batch_size = int(lo[0]), int(hi[0])
        self.stream = torch.cuda.Stream()

    def infer(self, images: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
        torch = self._torch
        s = self.spec
        n = images.shape[0]
        if n < self.min_batch_size:  # the profile's smallest batch: pad with zero rows, return only ours
            pad = self.min_batch_size - n
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.float32)])
            coeffs = np.concatenate([coeffs, np.zeros((pad, coeffs.shape[1]), np.float32)])
        x = torch.from_numpy(np.ascontiguousarray(images, np.float32)).cuda()
        c = torch.from_numpy(np.ascontiguousarray(coeffs, np.float32)).cuda()
        for name, t in ((s.image_name, x), (s.coeffs_name, c)):
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise EngineError(f"TensorRT refused input shape {tuple(t.shape)} for {name!r}")
        out = torch.empty(tuple(self.context.get_tensor_shape(s.output_name)), dtype=torch.float32, device="cuda")
        for name, t in ((s.image_name, x), (s.coeffs_name, c), (s.output_name, out)):
            self.context.set_tensor_address(name, t.data_ptr())
        with torch.cuda.stream(self.stream):
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise EngineError("TensorRT execute_async_v3 failed")
        self.stream.synchronize()
        return out[:n].cpu().numpy()

    def refit_bank(self, bank: np.ndarray) -> None:
        """Swap the ``forget_bank`` weights of a refittable engine (same K) without rebuilding it."""
        trt = self._trt
        refitter = trt.Refitter(self.engine, self._logger)
        arr = np.ascontiguousarray(bank, np.float32)
        if not refitter.set_named_weights("forget_bank", trt.Weights(arr)):
            raise EngineError("engine has no refittable 'forget_bank' weights (build it with --refittable)")
        if not refitter.refit_cuda_engine():
            raise EngineError("TensorRT refit failed")


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, bundle: Bundle, device: str, options: NoOptions = NoOptions()) -> None:
        super().__init__(bundle, device)
        self.runner = TensorRTRunner(bundle.plan_path, bundle.iospec)
        self.max_batch_size = self.runner.max_batch_size
        self._version = 0
        build = bundle.manifest.tensorrt
        self._fp16 = bool(build and build.fp16)
        self._refittable = bool(build and build.refittable)
        self._k = len(bundle.vectors)

    @property
    def numerics(self) -> str:
        return "fp16" if self._fp16 else "tf32"  # TensorRT enables TF32 unless told otherwise

    def check_bank(self, snapshot: BankSnapshot) -> None:
        super().check_bank(snapshot)
        # the bundle's own matrix (version 0) is what the engine was built with; any other needs a refit
        if snapshot.matrix_version != 0 and (not self._refittable or snapshot.k != self._k):
            raise MismatchError(
                f"the TensorRT engine holds its bank as constants (K={self._k}); this bank change (K={snapshot.k}) "
                "needs a --refittable engine with the same K, or a rebuild"
            )

    def _infer(self, images: np.ndarray, coeffs: np.ndarray, snapshot: BankSnapshot) -> np.ndarray:
        # the refit runs on first use of a new matrix, under the call lock; a failure is an EngineError
        if snapshot.matrix_version != self._version:
            self.runner.refit_bank(snapshot.matrix)
            self._version = snapshot.matrix_version
        return self.runner.infer(images, coeffs)


ENTRY = BackendEntry(
    name="tensorrt",
    factory=TensorRTBackend,
    available=_available,
    options=NoOptions,
    rank={"cuda": 30},
    description="the bundle's TensorRT engine (model.plan; forgetrt export trt)",
)
