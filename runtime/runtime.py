"""The Runtime: loads a bundle, resolves each request's forget spec to a coefficient row, and serves
it through a backend, directly (``infer``) or through the dynamic batcher (``submit``, ``infer_async``).

Example::

    from forgetrt.runtime import Runtime

    with Runtime.load("runs/bundle", RuntimeConfig(backend="onnxruntime")) as rt:
        r = rt.infer(images, forget=["forget-3"])          # names, weight 1 each
        r = rt.infer(images, forget={"forget-3": 0.5})     # name -> weight
        r = rt.infer(images, forget="eu")                  # a policy stored in the bundle
        fut = rt.submit(images, forget=[0, 0, 1, 0])       # a raw coefficient row, batched with others
        print(fut.result().logits, fut.result().bank_version)
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backends import DEVICES, Backend, create_backend
from .bank import VectorBank, validate_vector_name
from .batcher import SETTLED, BatchingConfig, BatchObserver, DynamicBatcher, InferResult, Job
from .bundle import Bundle
from .compose import BankSnapshot, Composition
from .errors import InvalidInputError, MismatchError, RuntimeClosedError, UnknownNameError, unknown
from .guards import DEFAULT_CANCEL_THRESHOLD, check_cancellation

__all__ = ["Runtime", "RuntimeConfig", "BatchingConfig", "InferResult", "PIXEL_POLICIES"]

log = logging.getLogger("forgetrt.runtime")
PIXEL_POLICIES = ("reject", "clamp")


@dataclass(frozen=True)
class RuntimeConfig:
    """How a runtime serves a bundle. ``batching.instances`` backend instances are built, one batcher
    worker each; a backend's own options are passed beside this (:meth:`Runtime.load`)."""

    backend: str = "auto"
    device: str = "auto"
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    pixel_policy: str = "reject"
    default_deadline_ms: float | None = None

    def __post_init__(self) -> None:
        if self.pixel_policy not in PIXEL_POLICIES:
            raise unknown("pixel policy", self.pixel_policy, PIXEL_POLICIES)
        if self.device not in DEVICES:
            raise unknown("device", self.device, DEVICES)
        if not isinstance(self.batching, BatchingConfig):
            raise InvalidInputError(f"batching must be a BatchingConfig, got {type(self.batching).__name__}")
        if self.default_deadline_ms is not None and not self.default_deadline_ms > 0:
            raise InvalidInputError(f"default deadline must be > 0 ms, got {self.default_deadline_ms}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dtype_error(dtype: Any, input_range: tuple[float, float]) -> InvalidInputError:
    """The error for images that are not float32 (one wording, wherever the check runs)."""
    lo, hi = (float(v) for v in input_range)
    return InvalidInputError(f"images must be float32 in [{lo}, {hi}], got dtype {dtype}")


class Runtime:
    def __init__(
        self,
        bundle: Bundle,
        backends: list[Backend],
        config: RuntimeConfig = RuntimeConfig(),
        observer: BatchObserver | None = None,
    ) -> None:
        if not backends:
            raise InvalidInputError("a runtime needs at least one backend instance")
        self.bundle = bundle
        self.config = config
        self.backends = backends
        stacked, mand = bundle.vector_arrays()
        # a hot swap must not bring in vectors that could cancel the mandatory ones (the export's check)
        self._mandatory = (mand.reshape(-1), bundle.mandatory_vectors()) if mand is not None else None
        m = bundle.manifest
        self._state = BankSnapshot(0, m.vectors, stacked, m.policies, m.coeff_range, m.mandatory, m.bundle_id)
        self._swap_lock = threading.RLock()
        engine_max = min((b.max_batch_size for b in backends if b.max_batch_size is not None), default=None)
        if engine_max is not None and config.batching.max_batch_size > engine_max:
            raise InvalidInputError(
                f"max_batch_size {config.batching.max_batch_size} exceeds the engine's maximum batch {engine_max}"
            )
        self._batcher = DynamicBatcher([b.run for b in backends], config.batching, observer=observer)
        self._direct = backends[0].run
        self._shape = tuple(bundle.iospec.shape)
        self._lo, self._hi = (float(v) for v in bundle.iospec.input_range)
        # [0, hi] ranges: one reduction checks range, sign, NaN and Inf at once. Non-negative float32
        # order like their bit patterns as uint32; negatives (sign bit), NaN and Inf all exceed hi's bits.
        self._hi_bits = (
            int(np.array(self._hi, np.float32).view(np.uint32)) if self._lo == 0.0 and self._hi > 0 else None
        )
        self._closed = False
        self._async_inflight = 0  # infer_async calls under way (inline dispatch needs a lone one)

    @classmethod
    def load(
        cls,
        bundle: str | os.PathLike | Bundle,
        config: RuntimeConfig = RuntimeConfig(),
        backend_options: Any = None,
        *,
        observer: BatchObserver | None = None,
        verify_key: str | os.PathLike | None = None,
    ) -> Runtime:
        """Load a bundle (hashes verified) and start ``config.batching.instances`` backend instances, one
        batcher worker each. ``backend_options``: the backend's options dataclass or a mapping of its fields.
        ``verify_key``: a public key the bundle's signature must verify against (see :mod:`.signing`)."""
        if not isinstance(config, RuntimeConfig):
            raise InvalidInputError(f"config must be a RuntimeConfig, got {type(config).__name__}")
        b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle, verify_key=verify_key)
        first = create_backend(config.backend, b, config.device, backend_options)
        # "auto" resolves once: every instance is the backend the first one chose
        rest = [
            create_backend(first.name, b, first.device, backend_options) for _ in range(config.batching.instances - 1)
        ]
        log.info(
            "runtime: bundle %s, backend %s on %s, %d instance(s)",
            b.bundle_id,
            first.name,
            first.device,
            config.batching.instances,
        )
        return cls(b, [first, *rest], config, observer)

    # ------------------------------------------------------------------ properties
    @property
    def iospec(self):
        return self.bundle.iospec

    @property
    def snapshot(self) -> BankSnapshot:
        """The bank snapshot new requests resolve against."""
        return self._state

    @property
    def backend_name(self) -> str:
        return self.backends[0].name

    @property
    def device(self) -> str:
        return self.backends[0].device

    def describe(self) -> dict[str, Any]:
        return {
            "bundle_id": self.bundle.bundle_id,
            "backend": self.backends[0].describe(),
            "instances": len(self.backends),
            "config": self.config.to_dict(),
            "bank": self._state.describe(),
            "labels": list(self.iospec.labels),
        }

    # ------------------------------------------------------------------ requests
    def validate_images(self, images: Any) -> np.ndarray:
        """float32 [N, C, H, W] (or one [C, H, W] image), finite, inside the input range (or clamped)."""
        if not isinstance(images, np.ndarray):
            raise InvalidInputError(f"images must be a numpy array, got {type(images).__name__}")
        if images.dtype != np.float32:
            raise dtype_error(images.dtype, (self._lo, self._hi))
        if images.ndim == 3:
            images = images[None]
        if images.shape[1:] != self._shape or images.ndim != 4:
            raise InvalidInputError(
                f"images must have shape [N, {', '.join(map(str, self._shape))}], got {list(images.shape)}"
            )
        if images.shape[0] == 0:
            raise InvalidInputError("images: the batch is empty")
        if self._hi_bits is not None:
            ok = images.view(np.uint32).max() <= self._hi_bits
        else:  # NaN makes both comparisons false, so it lands in the slow path too
            ok = images.min() >= self._lo and images.max() <= self._hi
        if not ok:
            lo, hi = self._lo, self._hi
            if not np.all(np.isfinite(images)):
                raise InvalidInputError("images contain NaN or Inf")
            if images.min() < lo or images.max() > hi:
                if self.config.pixel_policy == "reject":
                    raise InvalidInputError(
                        f"pixels must lie in [{lo}, {hi}] (the model's input space), found [{images.min():.4g}, "
                        f"{images.max():.4g}]; "
                        "load the runtime with pixel_policy='clamp' to clip instead"
                    )
                images = np.clip(images, lo, hi)
        return images if images.flags.c_contiguous else np.ascontiguousarray(images)

    def _prepare(
        self, images: Any, forget: Composition | None, coeffs: Any
    ) -> tuple[np.ndarray, np.ndarray, BankSnapshot]:
        """Validated images, the request's coefficient row ([K] or [N, K]) and the bank snapshot it resolved against."""
        imgs = self.validate_images(images)
        snap = self._state  # one snapshot for the whole request
        if coeffs is None:
            return imgs, snap.coeff_row(forget), snap
        if forget is not None:
            raise InvalidInputError("give either forget or coeffs, not both")
        row = np.asarray(coeffs, dtype=np.float32) if isinstance(coeffs, (np.ndarray, list, tuple)) else None
        if row is None or row.shape not in ((snap.k,), (imgs.shape[0], snap.k)):
            raise InvalidInputError(
                f"coeffs must have shape [{snap.k}] or [{imgs.shape[0]}, {snap.k}], got "
                f"{None if row is None else list(row.shape)}"
            )
        if not np.all(np.isfinite(row)):
            raise InvalidInputError("coeffs contain NaN or Inf")
        if snap.coeff_range is not None and (row.min() < snap.coeff_range[0] or row.max() > snap.coeff_range[1]):
            raise InvalidInputError(f"coeffs outside the bundle's coefficient range {list(snap.coeff_range)}")
        return imgs, row, snap

    def _job(
        self,
        images: Any,
        forget: Composition | None,
        coeffs: Any,
        deadline_ms: float | None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Job:
        imgs, row, snap = self._prepare(images, forget, coeffs)
        ms = deadline_ms if deadline_ms is not None else self.config.default_deadline_ms
        deadline = None
        if ms is not None:
            if not ms > 0:
                raise InvalidInputError(f"deadline must be > 0 ms, got {ms}")
            deadline = time.monotonic() + ms / 1e3
        if loop is None:
            return Job(imgs, row, snap, deadline)
        return Job(imgs, row, snap, deadline, loop.create_future(), loop)

    def infer(self, images: Any, forget: Composition | None = None, *, coeffs: Any = None) -> InferResult:
        """Run one request now, on the calling thread (no batching): lowest latency for a lone caller."""
        imgs, row, snap = self._prepare(images, forget, coeffs)
        if self._closed:
            raise RuntimeClosedError("the runtime is shut down")
        n = imgs.shape[0]
        coeff_mat = row if row.ndim == 2 else (row[None] if n == 1 else np.repeat(row[None], n, axis=0))
        t0 = time.perf_counter()
        out = self._direct(imgs, coeff_mat, snap)
        return InferResult(out, snap.version, 0.0, (time.perf_counter() - t0) * 1e6, n)

    def submit(
        self, images: Any, forget: Composition | None = None, *, coeffs: Any = None, deadline_ms: float | None = None
    ) -> Future:
        """Queue one request for the dynamic batcher; the future resolves to an :class:`InferResult`."""
        return self._batcher.submit(self._job(images, forget, coeffs, deadline_ms))

    def infer_now(
        self, images: Any, forget: Composition | None = None, *, coeffs: Any = None, deadline_ms: float | None = None
    ) -> InferResult | None:
        """Run one request right here, as inline dispatch would (the batcher idle, this batch size already
        run on this bank, the engine call expected within ``inline_max_us``), or return None (then submit
        it). For a caller that knows the request is alone and is on the thread that should run it: the
        engine side of :mod:`.frontends`, which sees every request of a read before running any."""
        if not self._batcher.inline_max_s:
            return None
        job = self._job(images, forget, coeffs, deadline_ms)
        if not self._batcher.could_run_inline(job):
            return None
        return self._batcher.run_inline(job)  # the result, None (no longer idle), or the job's error raised

    def submit_async(
        self, images: Any, forget: Composition | None = None, *, coeffs: Any = None, deadline_ms: float | None = None
    ) -> asyncio.Future:
        """``submit`` from the running event loop's thread, answered by an asyncio future of that loop (settled
        once per batch, on the loop), with no coroutine of its own: for code that answers from a callback."""
        return self._batcher.submit(self._job(images, forget, coeffs, deadline_ms, asyncio.get_running_loop()))

    async def infer_async(
        self,
        images: Any,
        forget: Composition | None = None,
        *,
        coeffs: Any = None,
        deadline_ms: float | None = None,
        alone: Callable[[], bool] | None = None,
    ) -> InferResult:
        """``submit`` for asyncio code: the batcher resolves an asyncio future of the running loop directly
        (one wake-up of the loop per batch, not per request). A lone request whose engine call is short
        (``BatchingConfig.inline_max_us``) runs right here on the loop's thread instead; ``alone``, if given,
        tells whether the caller knows of no other request under way (a server counts those still being
        read, which this runtime cannot see)."""
        if not self._batcher.inline_max_s:
            loop = asyncio.get_running_loop()
            return await self._batcher.submit(self._job(images, forget, coeffs, deadline_ms, loop))
        self._async_inflight += 1
        try:
            job = self._job(images, forget, coeffs, deadline_ms, asyncio.get_running_loop())
            if self._batcher.could_run_inline(job):
                # one turn of the loop first: callers that are ready to run (other requests already read)
                # arrive here meanwhile and count as in flight, and then this one is not alone
                await asyncio.sleep(0)
                lone = self._async_inflight == 1 and (alone is None or alone())
                if lone and (res := self._batcher.run_inline(job)) is not None:
                    return await job.future if res is SETTLED else res
            return await self._batcher.submit(job)
        finally:
            self._async_inflight -= 1

    # ------------------------------------------------------------------ hot swap
    def _install(
        self,
        names: tuple[str, ...],
        matrix: np.ndarray,
        policies: Mapping[str, Mapping[str, float]],
        label: str,
        *,
        matrix_changed: bool = True,
        version: int | None = None,
        dry_run: bool = False,
    ) -> BankSnapshot:
        """Publish a new snapshot, once every backend has said it can serve it (else MismatchError,
        and the old snapshot keeps serving). ``version``: the new snapshot's version (a cluster's bank
        generation; it must exceed the current one); ``dry_run``: run every check, publish nothing."""
        with self._swap_lock:
            old = self._state
            if version is not None and version <= old.version:
                raise InvalidInputError(f"bank version {version} does not follow the served version {old.version}")
            try:
                version = old.version + 1 if version is None else version
                matrix_version = version if matrix_changed else old.matrix_version
                new = BankSnapshot(
                    version, names, matrix, policies, old.coeff_range, old.mandatory, label, matrix_version
                )
            except UnknownNameError as e:
                raise MismatchError(f"bank change refused, a policy would dangle: {e}") from e
            if self._mandatory is not None and matrix_changed:
                threshold = self.bundle.manifest.cancel_threshold
                check_cancellation(
                    new.matrix,
                    self._mandatory[0],
                    new.coeff_range,
                    DEFAULT_CANCEL_THRESHOLD if threshold is None else threshold,
                    selectable_names=new.names,
                    mandatory_vectors=self._mandatory[1],
                )
            for b in self.backends:
                b.check_bank(new)
            if dry_run:
                return new
            self._state = new  # atomic reference swap: in-flight requests keep their snapshot
            log.info("bank version %d installed (%d vectors, %s)", new.version, new.k, label)
            return new

    def _vector(self, vector: Any) -> np.ndarray:
        v = np.asarray(vector, dtype=np.float32)
        if v.shape != tuple(self.iospec.shape) or not np.all(np.isfinite(v)):
            raise InvalidInputError(
                f"a vector must be finite float32 of shape {tuple(self.iospec.shape)}, got {v.shape}"
            )
        return v.reshape(-1)

    def reload_bank(
        self,
        path: str | os.PathLike | VectorBank,
        *,
        vectors: list[str] | None = None,
        version: int | None = None,
        dry_run: bool = False,
    ) -> BankSnapshot:
        """Serve the vectors of bank folder ``path`` (or of a loaded :class:`VectorBank`; same model,
        checked) without rebuilding the engine. ``version`` sets the new snapshot's version (it must
        exceed the served one: a cluster's bank generation); ``dry_run`` checks everything and serves
        nothing (the snapshot that would be served is returned)."""
        bank = path if isinstance(path, VectorBank) else VectorBank.load(path)  # I/O and hashing outside the lock
        path = bank.path or "(bank)"
        bank.check_model(self.bundle.fingerprint, self.iospec, what=f"bundle {self.bundle.path}")
        with self._swap_lock:
            s = self._state
            names = vectors or [n for n in bank.names if n not in s.mandatory]
            clash = [n for n in names if n in s.mandatory]
            if clash:
                raise InvalidInputError(f"vectors {clash} are mandatory in this bundle and cannot be selectable")
            if not names:
                raise InvalidInputError(f"bank {path} has no selectable vector")
            return self._install(
                tuple(names), bank.stack(names), s.policies, str(Path(path)), version=version, dry_run=dry_run
            )

    def revert_to(self, snapshot: BankSnapshot, *, label: str = "revert") -> BankSnapshot:
        """Serve ``snapshot``'s vectors and policies again, as a new version (e.g. to undo a change that
        could not be recorded)."""
        with self._swap_lock:
            return self._install(snapshot.names, snapshot.matrix, snapshot.policies, label)

    # Each change reads the current snapshot and installs its successor under the (reentrant) swap
    # lock, so two concurrent changes never build on the same snapshot and lose one of them.

    def add_vector(self, name: str, vector: Any, *, replace: bool = False) -> BankSnapshot:
        validate_vector_name(name)
        v = self._vector(vector)
        with self._swap_lock:
            s = self._state
            if name in s.mandatory:
                raise InvalidInputError(f"{name!r} is mandatory in this bundle and cannot be selectable")
            if name in s.names:
                if not replace:
                    raise InvalidInputError(f"vector {name!r} is already served; pass replace=True")
                m = np.array(s.matrix)
                m[s.names.index(name)] = v
                return self._install(s.names, m, s.policies, f"replace {name}")
            return self._install((*s.names, name), np.vstack([s.matrix, v[None]]), s.policies, f"add {name}")

    def remove_vector(self, name: str) -> BankSnapshot:
        with self._swap_lock:
            s = self._state
            if name not in s.names:
                raise unknown("vector", name, s.names)
            if s.k == 1:
                raise InvalidInputError("cannot remove the last selectable vector")
            keep = [i for i, n in enumerate(s.names) if n != name]
            return self._install(tuple(s.names[i] for i in keep), s.matrix[keep], s.policies, f"remove {name}")

    def set_policy(self, name: str, weights: Mapping[str, float]) -> BankSnapshot:
        with self._swap_lock:
            s = self._state
            s.coeff_row(dict(weights))  # validates names, weights and range before anything changes
            policies = {**s.policies, name: {k: float(v) for k, v in weights.items()}}
            return self._install(s.names, s.matrix, policies, f"policy {name}", matrix_changed=False)

    def remove_policy(self, name: str) -> BankSnapshot:
        with self._swap_lock:
            s = self._state
            if name not in s.policies:
                raise unknown("policy", name, s.policies)
            policies = {k: v for k, v in s.policies.items() if k != name}
            return self._install(s.names, s.matrix, policies, f"remove policy {name}", matrix_changed=False)

    # ------------------------------------------------------------------ lifecycle
    @property
    def closed(self) -> bool:
        return self._closed

    def pending(self) -> int:
        return self._batcher.pending()

    def close(self, *, drain: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        self._batcher.shutdown(drain=drain)
        for b in self.backends:
            b.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
