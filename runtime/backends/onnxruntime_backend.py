"""onnxruntime backend: CPU execution provider by default; CUDA EP with IOBinding where onnxruntime-gpu
is installed and the device is cuda. The bank is fed through the overridable ``forget_bank``
initializer whenever it differs from the one baked into the graph (hot swap without a rebuild)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import numpy as np

from ..bundle import Bundle
from ..compose import BankSnapshot
from ..errors import CorruptArtifactError, InvalidInputError, MismatchError
from .base import Backend, BackendEntry

__all__ = ["OnnxRuntimeBackend", "OnnxRuntimeOptions", "ort_cuda_available", "ort_distributions"]


@dataclass(frozen=True)
class OnnxRuntimeOptions:
    threads: int | None = field(
        default=None, metadata={"help": "onnxruntime: intra-op threads [default: onnxruntime's choice]."}
    )

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise InvalidInputError(f"threads must be >= 1, got {self.threads}")


def ort_cuda_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def _with_bank_input(path) -> bytes:
    """The graph at ``path`` with ``forget_bank`` (and the coefficients' K) declared as overridable inputs."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    if any(i.name == "forget_bank" for i in model.graph.input):
        return model.SerializeToString()
    bank = next(i for i in model.graph.initializer if i.name == "forget_bank")
    model.graph.input.append(helper.make_tensor_value_info("forget_bank", TensorProto.FLOAT, ["K", bank.dims[1]]))
    for i in model.graph.input:
        dims = i.type.tensor_type.shape.dim
        if i.name != "forget_bank" and len(dims) == 2 and dims[1].dim_value == bank.dims[0]:
            dims[1].ClearField("dim_value")
            dims[1].dim_param = "K"
    return model.SerializeToString()


def ort_distributions() -> list[str]:
    """The installed distributions that provide the ``onnxruntime`` package (more than one shadow each other)."""
    from importlib import metadata

    found = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        found.append(dist)
    return found


_BOTH_BUILDS = (
    "both onnxruntime and onnxruntime-gpu are installed and one shadows the other; keep one: "
    "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'forgetrt[gpu]' (or 'forgetrt[cpu]')"
)


def _available(bundle: Bundle, device: str, options: OnnxRuntimeOptions) -> str | None:
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed (pip install 'forgetrt[cpu]', or 'forgetrt[gpu]' for CUDA)"
    if device == "cuda" and not ort_cuda_available():
        if len(ort_distributions()) > 1:
            return _BOTH_BUILDS
        return "onnxruntime has no CUDAExecutionProvider (pip install 'forgetrt[gpu]' in place of 'forgetrt[cpu]')"
    return None


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    thread_safe = True  # InferenceSession.run is thread-safe

    def __init__(self, bundle: Bundle, device: str, options: OnnxRuntimeOptions = OnnxRuntimeOptions()) -> None:
        super().__init__(bundle, device)
        import onnxruntime as ort

        threads = options.threads
        so = ort.SessionOptions()
        so.log_severity_level = 3  # the overridable forget_bank initializer is intended; silence ORT's note
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        self._ort = ort
        # a bundle with mandatory vectors ships a graph whose bank is a constant (nobody running the file
        # elsewhere can feed another bank); this runtime feeds only banks that passed its checks, so it
        # declares the bank as an input in memory to keep hot swap
        model = str(bundle.onnx_path) if not bundle.mandatory else _with_bank_input(bundle.onnx_path)
        try:
            self.session = ort.InferenceSession(model, so, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime's load errors (InvalidProtobuf, Fail, ...) share no base
            raise CorruptArtifactError(
                f"onnxruntime cannot load {bundle.onnx_path}: {str(e).splitlines()[0][:300]}"
            ) from e
        self._out = self.session.get_outputs()[0].name
        self._has_bank_input = any(i.name == "forget_bank" for i in self.session.get_overridable_initializers())
        self._bank_cache: tuple[int, object] | None = None  # (bank version, device OrtValue) for IOBinding
        if device == "cuda":
            self.thread_safe = False  # one IOBinding per call is cheap, but the cached device bank is shared
        self._run = self._fast_run()

    def _fast_run(self):
        """The session's C++ ``run`` without the Python wrapper's per-call checks (input names, OrtValue
        ownership, provider fallback: about 8 µs, as much as a small model's whole run); our feeds are
        always complete. Probed with one warm-up call; the public ``run`` where the binding differs."""
        self.fast_call = False
        zeros = np.zeros((1, *self.spec.shape), np.float32)
        feeds = {
            self.spec.image_name: zeros,
            self.spec.coeffs_name: np.zeros((1, len(self.bundle.vectors)), np.float32),
        }
        out = [self._out]
        public = self.session.run
        inner = getattr(self.session, "_sess", None)
        try:
            want = public(out, feeds)[0]
            if inner is not None and np.array_equal(inner.run(out, feeds, None)[0], want):
                self.fast_call = True
                return lambda feeds: inner.run(out, feeds, None)
        except Exception:  # noqa: BLE001 - any mismatch in the private binding: use the public API
            pass
        return lambda feeds: public(out, feeds)

    @property
    def numerics(self) -> str:
        return "tf32" if self.device == "cuda" else "fp32"  # the CUDA EP's convolutions use TF32 by default

    def check_bank(self, snapshot: BankSnapshot) -> None:
        super().check_bank(snapshot)
        if snapshot.matrix_version != 0 and not self._has_bank_input:
            raise MismatchError("this bundle's graph holds its bank as a constant: re-export it to hot-swap vectors")

    def _feeds(self, images: np.ndarray, coeffs: np.ndarray, snapshot: BankSnapshot) -> dict:
        feeds = {self.spec.image_name: images, self.spec.coeffs_name: coeffs}
        if snapshot.matrix_version != 0:  # matrix version 0 is the bundle's own bank, the graph's initializer
            feeds["forget_bank"] = snapshot.matrix
        return feeds

    def _infer(self, images: np.ndarray, coeffs: np.ndarray, snapshot: BankSnapshot) -> np.ndarray:
        feeds = self._feeds(images, coeffs, snapshot)
        if self.device != "cuda":
            return self._run(feeds)[0]
        io = self.session.io_binding()
        for name, arr in feeds.items():
            if name == "forget_bank":
                if self._bank_cache is None or self._bank_cache[0] != snapshot.matrix_version:
                    value = self._ort.OrtValue.ortvalue_from_numpy(snapshot.matrix, "cuda", 0)
                    self._bank_cache = (snapshot.matrix_version, value)
                io.bind_ortvalue_input(name, self._bank_cache[1])
            else:
                io.bind_cpu_input(name, arr)
        io.bind_output(self._out, "cuda")
        self.session.run_with_iobinding(io)
        return io.copy_outputs_to_cpu()[0]

    def describe(self) -> dict:
        d = super().describe()
        d["providers"] = self.session.get_providers()
        d["fast_call"] = self.fast_call
        return d


ENTRY = BackendEntry(
    name="onnxruntime",
    factory=OnnxRuntimeBackend,
    available=_available,
    options=OnnxRuntimeOptions,
    rank={"cuda": 10, "cpu": 20},
    description="the bundle's fused model.onnx on onnxruntime (CPU, or the CUDA execution provider with IOBinding)",
)
