"""PyTorch backend: the bundle's classifier weights with the forget prefix computed in torch.

The forget prefix ``image + coeffs @ bank + mandatory`` is one GEMM (``addmm``) in fp32: the mandatory
vectors (and, once Normalize is folded, the normalization mean) ride along as one extra bank row whose
coefficient is always 1.

``fuse`` (see :mod:`.torch_optimize`): "auto" (default: "cudnn" on CUDA when it passes a self-check
against the module as trained, else "bn"; "bn" on CPU), "none" (the module as trained), "bn" (BatchNorm
and Normalize folded into the convolutions) or "cudnn" (also conv+ReLU and conv+add+ReLU as cuDNN fused
kernels; CUDA only, an error if it fails its self-check).

``precision``: "fp32" (default; on CUDA, convolutions use TF32 as PyTorch does by default), "bf16"
(CPU or CUDA) or "fp16" (CUDA only). A folded module is cast to that type as a whole; with
``fuse="none"`` autocast runs the module. The prefix stays fp32 and the logits come back as fp32.

CPU: eager. CUDA: one CUDA graph per batch-size bucket (1, 2, 4, ... up to ``max_batch_size``), captured
on first use with static input buffers; a batch is padded up to its bucket and the graph replayed, which
removes the per-kernel launch overhead that dominates small batches. A new bank of the same K is
copied into the static bank buffer (no recapture); a different K recaptures lazily.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from dataclasses import dataclass, field

import numpy as np

from ..bundle import Bundle
from ..compose import BankSnapshot
from ..errors import BackendUnavailableError, InvalidInputError, unknown
from ..guards import apply_guard
from .base import TOLERANCES, Backend, BackendEntry

log = logging.getLogger("forgetrt.runtime")

__all__ = ["TorchBackend", "TorchOptions", "PRECISIONS", "FUSE_MODES"]

PRECISIONS = ("fp32", "bf16", "fp16")
FUSE_MODES = ("auto", "none", "bn", "cudnn")


@dataclass(frozen=True)
class TorchOptions:
    precision: str = field(
        default="fp32",
        metadata={
            "choices": PRECISIONS,
            "help": "torch backend: compute precision [default: fp32; fp16 on CUDA only].",
        },
    )
    fuse: str = field(
        default="auto",
        metadata={
            "choices": FUSE_MODES,
            "help": "torch backend: inference rewrite of the classifier [default: auto, cuDNN fusion on CUDA, BN "
            "folding on CPU].",
        },
    )
    cuda_graphs: bool = field(
        default=True, metadata={"help": "torch backend on CUDA: replay captured CUDA graphs [default: on]."}
    )
    #: the largest captured CUDA-graph bucket: the engine's batch limit on CUDA
    max_batch_size: int = 256

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise unknown("precision", self.precision, PRECISIONS)
        if self.fuse not in FUSE_MODES:
            raise unknown("fuse mode", self.fuse, FUSE_MODES)
        if self.max_batch_size < 1:
            raise InvalidInputError(f"max_batch_size must be >= 1, got {self.max_batch_size}")


def _available(bundle: Bundle, device: str, options: TorchOptions) -> str | None:
    if options.precision == "fp16" and device != "cuda":
        return "precision 'fp16' needs CUDA; on CPU use 'bf16' or 'fp32'"
    if options.fuse == "cudnn" and device != "cuda":
        return "fuse 'cudnn' needs CUDA; on CPU use 'bn' or 'none'"
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (pip install 'forgetrt[train]')"
    if not bundle.has_torch_classifier:
        return (
            "the bundle has no PyTorch weights (grafted onto an ONNX classifier, or exported from a torch.export "
            "program, which bundles never carry)"
        )
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "this torch build sees no CUDA device"
    return None


def _writable(a: np.ndarray) -> np.ndarray:
    """torch.from_numpy wants writable memory; cached coefficient rows are read-only (copy: tiny)."""
    return a if a.flags.writeable else a.copy()


class _Graph:
    """One captured bucket: the graph, its static device buffers and pinned host staging buffers."""

    __slots__ = ("graph", "x", "c", "out", "hx", "hc", "hout", "hx_np", "hc_np", "hout_np")

    def __init__(self, graph, x, c, out, hx, hc, hout) -> None:
        self.graph, self.x, self.c, self.out, self.hx, self.hc, self.hout = graph, x, c, out, hx, hc, hout
        self.hx_np, self.hc_np, self.hout_np = hx.numpy(), hc.numpy(), hout.numpy()


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, bundle: Bundle, device: str, options: TorchOptions = TorchOptions()) -> None:
        super().__init__(bundle, device)
        precision, fuse = options.precision, options.fuse
        if precision == "fp16" and device != "cuda":
            raise BackendUnavailableError("precision 'fp16' needs CUDA; on CPU use 'bf16' or 'fp32'")
        if fuse == "cudnn" and device != "cuda":
            raise BackendUnavailableError("fuse 'cudnn' needs CUDA; on CPU use 'bn' or 'none'")
        import torch

        self.torch = torch
        self.options = options
        self.precision = precision
        self._dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        self._channels_last = torch.channels_last if device == "cuda" else torch.contiguous_format
        self.fuse_requested = fuse
        self.fuse_fallback: str | None = None
        self._build_module(bundle.load_classifier(device), bundle)
        self.use_graphs = device == "cuda" and options.cuda_graphs
        self.thread_safe = not self.use_graphs
        if self.use_graphs:
            self.max_batch_size = options.max_batch_size
            self.buckets = [
                1 << i for i in range(options.max_batch_size.bit_length()) if (1 << i) <= options.max_batch_size
            ]
            if self.buckets[-1] != options.max_batch_size:
                self.buckets.append(options.max_batch_size)
        self._graphs: dict[int, _Graph] = {}
        self._bank_dev: tuple[int, object] | None = None  # (matrix version, device [K (+1 constant row), CHW])
        self._cache_lock = threading.Lock()

    @property
    def numerics(self) -> str:
        if self.precision != "fp32":
            return self.precision
        if self.device == "cuda" and (
            self.torch.backends.cudnn.allow_tf32 or self.torch.backends.cuda.matmul.allow_tf32
        ):
            return "tf32"
        return "fp32"

    # ------------------------------------------------------------------ module

    def _build_module(self, model, bundle: Bundle) -> None:
        from .torch_optimize import optimize_classifier

        torch = self.torch
        modes = {"auto": ["cudnn", "bn"] if self.device == "cuda" else ["bn"]}.get(
            self.fuse_requested, [self.fuse_requested]
        )
        for i, mode in enumerate(modes):
            opt = optimize_classifier(model, mode, impl="cudnn" if mode == "cudnn" else "reference")
            module = opt.module.to(memory_format=self._channels_last) if self.device == "cuda" else opt.module
            if mode != "none" and self._dtype != torch.float32:
                module = module.to(self._dtype)
            self.module, self.fuse, self.fused = module, mode, opt.fused
            self._offset = opt.offset
            if mode != "cudnn":
                break
            problem = self._self_check(model)
            if problem is None:
                break
            if i == len(modes) - 1:
                raise BackendUnavailableError(f"fuse 'cudnn' failed its self-check on this GPU: {problem}")
            self.fuse_fallback = f"cudnn: {problem}"
            log.warning(
                "torch backend: cuDNN fused kernels failed their self-check (%s); using fuse='%s'",
                problem,
                modes[i + 1],
            )
        # the constant row: mandatory vectors plus the normalization offset, added by the prefix GEMM
        _, mand = bundle.vector_arrays()
        const = None if mand is None else torch.from_numpy(mand)
        if self._offset is not None:
            off = self._offset.cpu().expand(tuple(self.spec.shape))
            const = off.clone() if const is None else const + off
        self._const = None if const is None else const.reshape(1, -1).float().to(self.device)

    def _self_check(self, reference) -> str | None:
        """None if the rewritten module matches the module as trained on random inputs, else why not."""
        torch = self.torch
        x = torch.rand((2, *self.spec.shape), generator=torch.Generator().manual_seed(0)).to(self.device)
        try:
            with torch.no_grad():
                want = reference(x).float()
                got = self._classify(x + (self._offset if self._offset is not None else 0)).float()
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - any failure of the fused kernels means: do not use them
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        err = float((got - want).abs().max())
        scale = max(1.0, float(want.abs().max()))
        if not err <= TOLERANCES[self.numerics] * scale:  # a broken fused kernel is off by O(1)
            return f"logits differ by {err:.3g} (scale {scale:.3g})"
        return None

    def _classify(self, z):
        """The classifier on the prefixed input z [N, C, H, W] (fp32); fp32 logits."""
        torch = self.torch
        if self.device == "cuda" or self.fuse != "none":
            z = z.to(dtype=self._dtype if self.fuse != "none" else torch.float32, memory_format=self._channels_last)
        if self.fuse == "none" and self._dtype != torch.float32:
            with torch.autocast(device_type=self.device, dtype=self._dtype):
                return self.module(z).float()
        out = self.module(z)
        return out if out.dtype == torch.float32 else out.float()

    # ------------------------------------------------------------------ bank and inference

    def _bank_matrix(self, snapshot: BankSnapshot):
        """The bank on the device, with the constant row appended when there is one. Keyed on the
        snapshot's matrix version; the cache is read and written under its own lock, because on CPU
        (thread-safe, no call lock) several threads run batches at once."""
        with self._cache_lock:
            cached = self._bank_dev
            if cached is not None and cached[0] == snapshot.matrix_version:
                return cached[1]
            t = self.torch.from_numpy(np.array(snapshot.matrix)).to(self.device)
            if self._const is not None:
                t = self.torch.cat([t, self._const])
            if self.use_graphs and cached is not None and tuple(cached[1].shape) == tuple(t.shape):
                cached[1].copy_(t)  # same K: update the buffer the captured graphs read
                t = cached[1]
            else:
                self._graphs.clear()  # new K (or first bank): graphs are recaptured on demand
            self._bank_dev = (snapshot.matrix_version, t)
            return t

    def _coeffs(self, coeffs: np.ndarray) -> np.ndarray:
        if self._const is None:
            return _writable(coeffs)
        return np.concatenate([coeffs, np.ones((coeffs.shape[0], 1), np.float32)], axis=1)

    def _forward(self, x, c, bank_t):
        """x [N, C, H, W], c [N, K(+1)], bank_t [K(+1), CHW], all fp32 on the device -> fp32 logits."""
        n = x.shape[0]
        z = self.torch.addmm(x.reshape(n, -1), c, bank_t)
        return self._classify(z.view(x.shape))

    def _infer(self, images: np.ndarray, coeffs: np.ndarray, snapshot: BankSnapshot) -> np.ndarray:
        torch = self.torch
        if not self.use_graphs:
            with torch.inference_mode():
                bank_t = self._bank_matrix(snapshot)
                x = torch.from_numpy(_writable(images)).to(self.device)
                c = torch.from_numpy(self._coeffs(coeffs)).to(self.device)
                out = self._forward(x, c, bank_t).cpu().numpy()
        else:
            with torch.no_grad():  # no_grad (not inference_mode): plain tensors for capture and copies
                out = self._replay(images, coeffs, snapshot)
        return apply_guard(out, self.bundle.manifest.guard_classes)  # the bundle's output guard, as in its graph

    def _replay(self, images: np.ndarray, coeffs: np.ndarray, snapshot: BankSnapshot) -> np.ndarray:
        n, k = coeffs.shape
        bucket = next(b for b in self.buckets if b >= n)
        bank_t = self._bank_matrix(snapshot)
        g = self._graphs.get(bucket)
        if g is None:
            g = self._graphs[bucket] = self._capture(bucket, bank_t)
        # stage into pinned memory (the previous call synchronized, so the buffers are free), pad with zeros;
        # column k (the constant row's coefficient, when there is one) stays 1 from the capture
        g.hx_np[:n] = images
        g.hc_np[:n, :k] = coeffs
        if n < bucket:
            g.hx_np[n:] = 0.0
            g.hc_np[n:, :k] = 0.0
        g.x.copy_(g.hx, non_blocking=True)
        g.c.copy_(g.hc, non_blocking=True)
        g.graph.replay()
        g.hout.copy_(g.out, non_blocking=True)
        self.torch.cuda.current_stream().synchronize()
        return g.hout_np[:n].copy()

    def _capture(self, bucket: int, bank_t) -> _Graph:
        torch = self.torch
        sx = torch.zeros((bucket, *self.spec.shape), device=self.device)
        hc = torch.zeros((bucket, bank_t.shape[0]), dtype=torch.float32, pin_memory=True)
        if self._const is not None:
            hc[:, -1] = 1.0
        sc = hc.to(self.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm up (cuDNN autotuning, allocator) before capture
                self._forward(sx, sc, bank_t)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            sout = self._forward(sx, sc, bank_t)
        hx = torch.zeros(tuple(sx.shape), dtype=torch.float32, pin_memory=True)
        hout = torch.zeros(tuple(sout.shape), dtype=torch.float32, pin_memory=True)
        return _Graph(graph, sx, sc, sout, hx, hc, hout)

    def describe(self) -> dict:
        d = super().describe()
        d["cuda_graphs"] = self.use_graphs
        d["precision"] = self.precision
        d["fuse"] = self.fuse
        d["fuse_requested"] = self.fuse_requested
        if self.fuse_fallback:
            d["fuse_fallback"] = self.fuse_fallback
        d["fused"] = dict(self.fused)
        if self.use_graphs:
            d["captured_buckets"] = sorted(self._graphs)
        return d


ENTRY = BackendEntry(
    name="torch",
    factory=TorchBackend,
    available=_available,
    options=TorchOptions,
    rank={"cuda": 20, "cpu": 10},  # CUDA-graph replay beats onnxruntime's CUDA EP; on CPU onnxruntime beats eager torch
    description="the bundle's PyTorch classifier: BN/Normalize folded, cuDNN fusion and CUDA graphs on CUDA",
)
