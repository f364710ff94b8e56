"""PyTorch backend: the bundle's classifier weights with the forget prefix computed in torch.

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
from ..errors import BackendUnavailableError, CorruptArtifactError
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


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, bundle: Bundle, device: str, *, cuda_graphs: bool = True, max_batch: int = 256) -> None:
        super().__init__(bundle, device)
        try:
            import torch
        except ImportError as e:
            raise BackendUnavailableError("torch is not installed") from e
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError("torch has no CUDA device here")
        self.torch = torch
        self.model = load_bundle_classifier(bundle, device)
        _, mand = bundle.vector_arrays()
        self.mandatory = None if mand is None else torch.from_numpy(mand).to(device)
        self.use_graphs = device == "cuda" and cuda_graphs
        self.thread_safe = not self.use_graphs
        if self.use_graphs:
            self.model.to(memory_format=torch.channels_last)
            self.max_batch = max_batch
            self.buckets = [1 << i for i in range(max_batch.bit_length()) if (1 << i) <= max_batch]
            if self.buckets[-1] != max_batch:
                self.buckets.append(max_batch)
        self._graphs: dict[int, tuple] = {}  # bucket -> (graph, static_x, static_c, static_out)
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
        if self.use_graphs:
            x = x.contiguous(memory_format=self.torch.channels_last)
        return self.model(x)

    def _infer(self, images: np.ndarray, coeffs: np.ndarray, bank: BankState) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            if not self.use_graphs:
                bank_t = self._bank(bank)
                x = torch.from_numpy(_writable(images)).to(self.device)
                c = torch.from_numpy(_writable(coeffs)).to(self.device)
                return self._forward(x, c, bank_t).float().cpu().numpy()
        with self._lock:
            return self._replay(images, coeffs, bank)

    def _replay(self, images: np.ndarray, coeffs: np.ndarray, bank: BankState) -> np.ndarray:
        torch = self.torch
        n = images.shape[0]
        bucket = next(b for b in self.buckets if b >= n)
        bank_t = self._bank(bank)
        if bucket not in self._graphs:
            self._graphs[bucket] = self._capture(bucket, bank_t)
        graph, sx, sc, sout = self._graphs[bucket]
        sx[:n].copy_(torch.from_numpy(_writable(images)), non_blocking=False)
        sc[:n].copy_(torch.from_numpy(_writable(coeffs)), non_blocking=False)
        if n < bucket:  # padding rows compute garbage-free zeros; their outputs are dropped
            sx[n:].zero_()
            sc[n:].zero_()
        graph.replay()
        return sout[:n].float().cpu().numpy()

    def _capture(self, bucket: int, bank_t):
        torch = self.torch
        sx = torch.zeros((bucket, *self.spec.shape), device=self.device)
        sc = torch.zeros((bucket, bank_t.shape[0]), device=self.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(3):  # warm up (cuDNN autotuning, allocator) before capture
                self._forward(sx, sc, bank_t)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            sout = self._forward(sx, sc, bank_t)
        return graph, sx, sc, sout

    def describe(self) -> dict:
        d = super().describe()
        d["cuda_graphs"] = self.use_graphs
        return d
