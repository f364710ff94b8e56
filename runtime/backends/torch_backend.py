"""PyTorch backend: the bundle's classifier weights with the forget prefix computed in torch.

``precision``: "fp32" (default; on CUDA, convolutions use TF32 as PyTorch does by default), "bf16"
(autocast, CPU or CUDA) or "fp16" (autocast, CUDA only). The forget prefix (image + coeffs @ bank) is
always computed in fp32; autocast covers the classifier, and the logits come back as fp32.

CPU: eager. CUDA: one CUDA graph per batch-size bucket (1, 2, 4, ... up to ``max_batch``), captured
on first use with static input buffers; a batch is padded up to its bucket and the graph replayed, which
removes the per-kernel launch overhead that dominates small batches. A new bank of the same K is
copied into the static bank buffer (no recapture); a different K recaptures lazily.
"""

from __future__ import annotations

import json
import threading

import numpy as np

from ..bundle import CLASSIFIER_JSON, CLASSIFIER_WEIGHTS, Bundle
from ..compose import BankState
from ..errors import BackendUnavailableError, CorruptArtifactError, InvalidInputError, unknown
from ..iospec import IOSpec
from .base import Backend

__all__ = ["TorchBackend", "load_bundle_classifier", "classifier_from_bytes"]


def _writable(a: np.ndarray) -> np.ndarray:
    """torch.from_numpy wants writable memory; cached coefficient rows are read-only (copy: tiny)."""
    return a if a.flags.writeable else a.copy()


def classifier_from_bytes(record_json: bytes, weights: bytes, fingerprint: str | None = None):
    """A classifier (eval mode, CPU) from a model record and safetensors bytes, optionally fingerprint-checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    from ..files import weights_fingerprint
    from ..models import create_model

    rec = json.loads(record_json)
    model = create_model(rec["arch"], IOSpec.from_dict(rec["iospec"]))
    try:
        state = load_safetensors(weights)
    except (SafetensorError, ValueError) as e:
        raise CorruptArtifactError(f"cannot read the classifier weights: {e}") from e
    model.load_state_dict(state, strict=True)
    if fingerprint is not None:
        fp = weights_fingerprint({k: v.numpy() for k, v in model.state_dict().items()})
        if fp != fingerprint:
            raise CorruptArtifactError(f"classifier weights have fingerprint {fp[:16]}…, expected {fingerprint[:16]}…")
    return model.eval()


def load_bundle_classifier(bundle: Bundle, device: str):
    """The bundle's PyTorch classifier in eval mode (fingerprint-checked against the bundle)."""
    if not bundle.has_torch_classifier:
        raise BackendUnavailableError(f"bundle {bundle.path} was grafted onto an ONNX classifier: it has no PyTorch weights")
    model = classifier_from_bytes((bundle.path / CLASSIFIER_JSON).read_bytes(), (bundle.path / CLASSIFIER_WEIGHTS).read_bytes(), bundle.fingerprint)
    return model.to(device)


class _Graph:
    """One captured bucket: the graph, its static device buffers and pinned host staging buffers."""

    __slots__ = ("graph", "x", "c", "out", "hx", "hc", "hout", "hx_np", "hc_np", "hout_np")

    def __init__(self, graph, x, c, out, hx, hc, hout) -> None:
        self.graph, self.x, self.c, self.out, self.hx, self.hc, self.hout = graph, x, c, out, hx, hc, hout
        self.hx_np, self.hc_np, self.hout_np = hx.numpy(), hc.numpy(), hout.numpy()


class TorchBackend(Backend):
    name = "torch"

    PRECISIONS = ("fp32", "bf16", "fp16")

    def __init__(self, bundle: Bundle, device: str, *, cuda_graphs: bool = True, max_batch: int = 256, precision: str = "fp32") -> None:
        super().__init__(bundle, device)
        if precision not in self.PRECISIONS:
            raise unknown("precision", precision, self.PRECISIONS)
        if precision == "fp16" and device != "cuda":
            raise BackendUnavailableError("precision 'fp16' needs CUDA; on CPU use 'bf16' or 'fp32'")
        try:
            import torch
        except ImportError as e:
            raise BackendUnavailableError("torch is not installed") from e
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError("torch has no CUDA device here")
        if max_batch < 1:
            raise BackendUnavailableError(f"max_batch must be >= 1, got {max_batch}")
        self.torch = torch
        self.precision = precision
        self._amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.model = load_bundle_classifier(bundle, device)
        _, mand = bundle.vector_arrays()
        self.mandatory = None if mand is None else torch.from_numpy(mand).to(device)
        self.use_graphs = device == "cuda" and cuda_graphs
        self.thread_safe = not self.use_graphs
        if device == "cuda":  # eager and graphs run the same kernels: channels-last convolutions
            self.model.to(memory_format=torch.channels_last)
        if self.use_graphs:
            self.max_batch = max_batch
            self.buckets = [1 << i for i in range(max_batch.bit_length()) if (1 << i) <= max_batch]
            if self.buckets[-1] != max_batch:
                self.buckets.append(max_batch)
        self._graphs: dict[int, _Graph] = {}
        self._bank_dev: tuple[int, object] | None = None  # (version, device tensor [K, CHW])
        self._lock = threading.Lock()

    def _bank(self, bank: BankState):
        if self._bank_dev is None or self._bank_dev[0] != bank.version:
            t = self.torch.from_numpy(np.array(bank.matrix)).to(self.device)
            if self.use_graphs and self._bank_dev is not None and tuple(self._bank_dev[1].shape) == tuple(t.shape):
                self._bank_dev[1].copy_(t)  # same K: update the buffer the captured graphs read
                self._bank_dev = (bank.version, self._bank_dev[1])
            else:
                self._graphs.clear()  # new K (or first bank): graphs are recaptured on demand
                self._bank_dev = (bank.version, t)
        return self._bank_dev[1]

    def _forward(self, x, c, bank_t):
        delta = (c @ bank_t).view(x.shape)
        x = x + delta
        if self.mandatory is not None:
            x = x + self.mandatory
        if self.device == "cuda":
            x = x.contiguous(memory_format=self.torch.channels_last)
        if self._amp_dtype is None:
            return self.model(x)
        with self.torch.autocast(device_type=self.device, dtype=self._amp_dtype):
            return self.model(x).float()

    def _infer(self, images: np.ndarray, coeffs: np.ndarray, bank: BankState) -> np.ndarray:
        torch = self.torch
        if not self.use_graphs:
            with torch.inference_mode():
                bank_t = self._bank(bank)
                x = torch.from_numpy(_writable(images)).to(self.device)
                c = torch.from_numpy(_writable(coeffs)).to(self.device)
                return self._forward(x, c, bank_t).float().cpu().numpy()
        if images.shape[0] > self.max_batch:  # Backend.run checks too; kept for direct callers
            raise InvalidInputError(f"batch of {images.shape[0]} exceeds the CUDA-graph maximum {self.max_batch}")
        with self._lock, torch.no_grad():  # no_grad (not inference_mode): plain tensors for capture and copies
            return self._replay(images, coeffs, bank)

    def _replay(self, images: np.ndarray, coeffs: np.ndarray, bank: BankState) -> np.ndarray:
        n = images.shape[0]
        bucket = next(b for b in self.buckets if b >= n)
        bank_t = self._bank(bank)
        g = self._graphs.get(bucket)
        if g is None:
            g = self._graphs[bucket] = self._capture(bucket, bank_t)
        # stage into pinned memory (the previous call synchronized, so the buffers are free), pad with zeros
        g.hx_np[:n] = images
        g.hc_np[:n] = coeffs
        if n < bucket:
            g.hx_np[n:] = 0.0
            g.hc_np[n:] = 0.0
        g.x.copy_(g.hx, non_blocking=True)
        g.c.copy_(g.hc, non_blocking=True)
        g.graph.replay()
        g.hout.copy_(g.out, non_blocking=True)
        self.torch.cuda.current_stream().synchronize()
        return g.hout_np[:n].copy()

    def _capture(self, bucket: int, bank_t) -> _Graph:
        torch = self.torch
        sx = torch.zeros((bucket, *self.spec.shape), device=self.device)
        sc = torch.zeros((bucket, bank_t.shape[0]), device=self.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm up (cuDNN autotuning, allocator) before capture
                self._forward(sx, sc, bank_t)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            sout = self._forward(sx, sc, bank_t).float()
        hx = torch.zeros(tuple(sx.shape), dtype=torch.float32, pin_memory=True)
        hc = torch.zeros(tuple(sc.shape), dtype=torch.float32, pin_memory=True)
        hout = torch.zeros(tuple(sout.shape), dtype=torch.float32, pin_memory=True)
        return _Graph(graph, sx, sc, sout, hx, hc, hout)

    def describe(self) -> dict:
        d = super().describe()
        d["cuda_graphs"] = self.use_graphs
        d["precision"] = self.precision
        if self.use_graphs:
            d["captured_buckets"] = sorted(self._graphs)
        return d
