"""What a served model does, whatever the protocol: the KServe v2 / Triton semantics shared by the REST
server (``server.py``) and the gRPC server (``grpc_server.py``).

A protocol front end turns its request into an :class:`InferCall` (tensors as numpy arrays, parameters as
plain Python values) and answers with what :meth:`ModelService.infer` returns. Everything else lives here
once: composition from request parameters (the protocol-valid strings ``"forget-3=1,forget-7=0.5"``,
``"forget-3,forget-7"``, a ``policy``, and the object forms as an extension), requested outputs and the
classification extension, ``timeout`` as the request's deadline, admission, in-flight limits,
readiness, Triton's model configuration and statistics, and bank changes through the control plane.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .control import BankLoadRefused, ControlDisabled, ControlPlane, RecordError, Unauthorized
from .errors import (
    ArtifactError,
    DeadlineExceededError,
    EngineError,
    ForgetRTError,
    InvalidInputError,
    QueueFullError,
    RuntimeClosedError,
    UnknownNameError,
)
from .limits import ServerLimits
from .runtime import Runtime

__all__ = [
    "InferCall",
    "InferOutcome",
    "ModelService",
    "OutputRequest",
    "parse_forget",
    "parse_request_parameters",
    "Overloaded",
    "NotAdmitted",
    "UnknownModel",
    "TooLarge",
    "BodyTimeout",
    "WorkerLost",
    "STATUS",
    "EXTENSIONS",
    "status_for",
    "ENGINE_FAILURES_UNREADY",
]

ENGINE_FAILURES_UNREADY = 3  # failed batches in a row after which readiness turns false (until a probe passes)
#: request parameters this server understands; anything else is refused rather than silently ignored
REQUEST_PARAMETERS = ("forget", "policy", "binary_data_output", "timeout", "priority", "sequence_id")
_NAME_WEIGHT = ","
#: the largest ``forget`` parameter accepted: far beyond any bank, small enough to decode in a few ms
MAX_FORGET_CHARS = 1 << 20
MAX_FORGET_ITEMS = 1 << 16


class TooLarge(InvalidInputError):
    """413 / RESOURCE_EXHAUSTED: the body is over the limit."""


class BodyTimeout(InvalidInputError):
    """408: the body did not arrive in time."""


class WorkerLost(ForgetRTError):
    """503 / UNAVAILABLE: the process parsing a large body died (out of memory, killed); retry."""


class Overloaded(QueueFullError):
    """429 / RESOURCE_EXHAUSTED: too many requests in flight."""


class NotAdmitted(ForgetRTError):
    """503 / UNAVAILABLE: this server may not answer now (a cluster replica whose bank lease lapsed)."""


class UnknownModel(UnknownNameError):
    """404 / NOT_FOUND: a model or version this server does not serve."""


#: the HTTP status of each error a request can end in (most specific first); gRPC maps from these
STATUS: list[tuple[type, int]] = [
    (Overloaded, 429),
    (QueueFullError, 429),
    (DeadlineExceededError, 408),
    (BodyTimeout, 408),
    (TooLarge, 413),
    (RuntimeClosedError, 503),
    (WorkerLost, 503),
    (NotAdmitted, 503),
    (EngineError, 500),
    (RecordError, 500),
    (ControlDisabled, 403),
    (Unauthorized, 401),
    (BankLoadRefused, 404),
    (UnknownModel, 404),
    (UnknownNameError, 400),
    (InvalidInputError, 400),
    (ArtifactError, 400),
    (ForgetRTError, 400),
]
#: protocol extensions this server implements (reported by the server metadata)
EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration", "statistics", "model_repository")


def status_for(e: ForgetRTError) -> int:
    return next(code for cls, code in STATUS if isinstance(e, cls))


# ---------------------------------------------------------------------------------------------- parameters


def _weight(name: str, text: str) -> float:
    try:
        w = float(text)
    except ValueError:
        raise InvalidInputError(f"'forget': the weight of {name!r} must be a number, got {text[:40]!r}") from None
    if not math.isfinite(w):
        raise InvalidInputError(f"'forget': the weight of {name!r} must be finite")
    return w


def _check_forget_size(value: Any) -> None:
    """Refuse a ``forget`` larger than any bank could need: over MAX_FORGET_ITEMS names, or over
    MAX_FORGET_CHARS characters (a string, or the names of a list or mapping together)."""
    if isinstance(value, str):
        size = len(value)
    elif isinstance(value, (dict, list)):
        if len(value) > MAX_FORGET_ITEMS:
            raise InvalidInputError(f"'forget' names more than {MAX_FORGET_ITEMS} vectors")
        size = sum(len(n) for n in value if isinstance(n, str))
    else:
        return
    if size > MAX_FORGET_CHARS:
        raise InvalidInputError(f"'forget' is longer than {MAX_FORGET_CHARS} characters")


def parse_forget(value: Any) -> Any:
    """A request's ``forget`` parameter as a composition the runtime takes.

    Protocol-valid strings: ``"forget-3,forget-7"`` (weight 1 each) and ``"forget-3=1,forget-7=0.5"``;
    as an extension, a JSON object or list (also inside a string) mapping names to weights or listing them.
    """
    if value is None:
        return None
    _check_forget_size(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("{", "[")):
            try:
                value = json.loads(text)
            except (ValueError, RecursionError) as e:  # ValueError: also integers past Python's digit limit
                raise InvalidInputError(f"'forget' is not valid JSON: {str(e)[:200]}") from None
            _check_forget_size(value)
        else:
            items = [s.strip() for s in text.split(_NAME_WEIGHT) if s.strip()]
            if not items:
                raise InvalidInputError("'forget' names no vector")
            if len(items) > MAX_FORGET_ITEMS:
                raise InvalidInputError(f"'forget' names more than {MAX_FORGET_ITEMS} vectors")
            if not any("=" in s for s in items):
                return items
            out: dict[str, float] = {}
            for s in items:
                name, sep, w = s.partition("=")
                name = name.strip()
                if not name:
                    raise InvalidInputError(f"'forget': {s[:60]!r} has no vector name")
                if name in out:
                    raise InvalidInputError(f"'forget': vector {name[:60]!r} given twice")
                out[name] = _weight(name, w.strip()) if sep else 1.0
            return out
    if not isinstance(value, (dict, list)):
        raise InvalidInputError("'forget' must be a string such as 'forget-3=1,forget-7=0.5', a mapping or a list")
    if isinstance(value, list) and not all(isinstance(n, str) for n in value):
        raise InvalidInputError("'forget' as a list must hold vector names")
    if isinstance(value, dict) and not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) for w in value.values()
    ):
        raise InvalidInputError("'forget' as a mapping must map vector names to numbers")
    return value


@dataclass(frozen=True)
class RequestParameters:
    forget: Any = None
    binary_data_output: bool | None = None
    timeout_us: int | None = None


def parse_request_parameters(params: Mapping[str, Any] | None) -> RequestParameters:
    """The request-level parameters (REST JSON values or gRPC InferParameter values), checked."""
    if params is None:
        return RequestParameters()
    if not isinstance(params, Mapping):
        raise InvalidInputError("request 'parameters' must be an object")
    unknown = sorted(k for k in params if k not in REQUEST_PARAMETERS)
    if unknown:
        raise InvalidInputError(
            f"unknown request parameters {[u[:60] for u in unknown][:8]}; valid: {', '.join(REQUEST_PARAMETERS)}"
        )
    forget, policy = params.get("forget"), params.get("policy")
    if forget is not None and policy is not None:
        raise InvalidInputError("give 'forget' or 'policy', not both")
    if policy is not None and not isinstance(policy, str):
        raise InvalidInputError("'policy' must be a string")
    binary = params.get("binary_data_output")
    if isinstance(binary, str) and binary.lower() in ("true", "false"):  # some clients send the string form
        binary = binary.lower() == "true"
    if binary is not None and not isinstance(binary, bool):
        raise InvalidInputError("'binary_data_output' must be true or false")
    timeout = params.get("timeout")
    if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool) or not 0 <= timeout < 2**63):
        raise InvalidInputError("'timeout' must be an integer of microseconds in [0, 2^63)")
    priority = params.get("priority")
    if priority not in (None, 0):
        raise InvalidInputError("'priority' is not supported: this server has one priority level (omit it or send 0)")
    if params.get("sequence_id") not in (None, 0, ""):
        raise InvalidInputError("'sequence_id' is not supported: the model is stateless")
    return RequestParameters(
        forget=policy if policy is not None else parse_forget(forget),
        binary_data_output=binary,
        timeout_us=timeout or None,  # 0: no timeout, as in Triton
    )


# ---------------------------------------------------------------------------------------------- calls


def _never() -> bool:
    return False


def _runtime_args(call: InferCall) -> dict[str, Any]:
    """A call as the arguments every runtime entry point takes (images, forget, coeffs, deadline_ms)."""
    timeout = call.params.timeout_us
    return {
        "images": call.images,
        "forget": call.params.forget,
        "coeffs": call.coeffs,
        "deadline_ms": None if timeout is None else timeout / 1e3,
    }


@dataclass(frozen=True)
class OutputRequest:
    name: str
    binary: bool | None = None  # REST: this output's binary_data flag (None: the request's default)
    class_count: int = 0  # the classification extension: the top ``class_count`` classes as strings


def parse_output_parameters(name: str, params: Mapping[str, Any] | None) -> OutputRequest:
    params = params or {}
    if not isinstance(params, Mapping):
        raise InvalidInputError("an output's parameters must be an object")
    unknown = sorted(k for k in params if k not in ("binary_data", "classification", "class_count"))
    if unknown:
        raise InvalidInputError(f"unknown output parameters {[u[:60] for u in unknown][:8]} for {name[:60]!r}")
    binary = params.get("binary_data")
    if isinstance(binary, str) and binary.lower() in ("true", "false"):
        binary = binary.lower() == "true"
    if binary is not None and not isinstance(binary, bool):
        raise InvalidInputError("an output's binary_data must be true or false")
    if "classification" in params and "class_count" in params:
        raise InvalidInputError("give 'classification' or 'class_count', not both")
    k = params.get("classification", params.get("class_count", 0))
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise InvalidInputError("'classification' (class_count) must be a non-negative integer")
    return OutputRequest(name, binary, k)


@dataclass
class InferCall:
    images: np.ndarray
    coeffs: np.ndarray | None = None
    params: RequestParameters = field(default_factory=RequestParameters)
    outputs: list[OutputRequest] | None = None  # None: every output, as tensors
    request_id: str | None = None


@dataclass
class InferOutcome:
    output_name: str
    logits: np.ndarray
    classes: np.ndarray | None  # [N, k] object array of "value:index[:label]" (the classification extension)
    bank_version: int
    queue_us: float
    compute_us: float
    request: OutputRequest


# ---------------------------------------------------------------------------------------------- statistics


class ModelStats:
    """Triton's per-model statistics (cumulative counts and nanoseconds), updated by every protocol."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.inference_count = 0  # images
        self.last_inference_ms = 0
        self.success = [0, 0]
        self.fail = [0, 0]
        self.queue = [0, 0]
        self.compute = [0, 0]

    def ok(self, images: int, total_s: float, queue_us: float, compute_us: float) -> None:
        with self._lock:
            self.inference_count += images
            self.last_inference_ms = int(time.time() * 1e3)
            for slot, ns in (
                (self.success, total_s * 1e9),
                (self.queue, queue_us * 1e3),
                (self.compute, compute_us * 1e3),
            ):
                slot[0] += 1
                slot[1] += int(ns)

    def failed(self, total_s: float, n: int = 1) -> None:
        with self._lock:
            self.fail[0] += n
            self.fail[1] += int(total_s * 1e9)

    def to_dict(self, name: str, executions: int = 0) -> dict[str, Any]:
        """Triton's JSON form; ``executions``: the engine calls (counted by the batch observer)."""

        def d(slot: list[int]) -> dict[str, int]:
            return {"count": slot[0], "ns": slot[1]}

        zero = {"count": 0, "ns": 0}
        with self._lock:
            return {
                "name": name,
                "version": "1",
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": executions,
                "inference_stats": {
                    "success": d(self.success),
                    "fail": d(self.fail),
                    "queue": d(self.queue),
                    "compute_input": dict(zero),
                    "compute_infer": d(self.compute),
                    "compute_output": dict(zero),
                    "cache_hit": dict(zero),
                    "cache_miss": dict(zero),
                },
                "batch_stats": [],
            }


# ---------------------------------------------------------------------------------------------- service


@dataclass
class _Health:
    loading: str | None = None  # the bank being loaded
    engine_failures: int = 0  # failed engine batches since the last success


class ModelService:
    """One served model: what every protocol front end calls."""

    def __init__(
        self,
        runtime: Runtime,
        model_name: str,
        *,
        limits: ServerLimits = ServerLimits(),
        control: ControlPlane = ControlPlane(),
        admission: Callable[[], str | None] | None = None,
        instance: str | None = None,
        stats: ModelStats | None = None,
        metrics: Any = None,
    ) -> None:
        self.runtime, self.model_name, self.limits, self.control = runtime, model_name, limits, control
        self.metrics = metrics  # a ServerMetrics (prometheus), or None
        self.admission, self.instance = admission, instance
        self.spec = runtime.iospec
        self.stats = stats or ModelStats()
        self.health = _Health()
        self.inflight = 0
        self._ok_counter: Any = None
        self._gauge_version: int | None = None
        self._load_lock: asyncio.Lock | None = None
        labels = list(runtime.bundle.iospec.labels or [])
        self.labels = labels if len(labels) == self.spec.num_classes else None

    # ------------------------------------------------------------------ names
    def check_model(self, name: str, version: str | None = None) -> None:
        if name != self.model_name:
            raise UnknownModel(f"unknown model {name[:100]!r}; this server serves {self.model_name!r}")
        if version not in (None, "", "1"):
            raise UnknownModel(f"unknown version {version[:40]!r} of model {self.model_name!r}; valid: 1")

    # ------------------------------------------------------------------ descriptions
    async def metadata(self) -> dict[str, Any]:
        spec, bank = self.spec, self.runtime.snapshot
        return {
            "name": self.model_name,
            "versions": ["1"],
            "platform": f"forgetrt_{self.runtime.backend_name}",
            "inputs": [
                {"name": spec.image_name, "datatype": "FP32", "shape": [-1, *spec.shape]},
                {"name": spec.coeffs_name, "datatype": "FP32", "shape": [-1, bank.k]},
            ],
            "outputs": [{"name": spec.output_name, "datatype": "FP32", "shape": [-1, spec.num_classes]}],
            "parameters": self._bank_parameters(),
        }

    def _bank_parameters(self) -> dict[str, Any]:
        bank = self.runtime.snapshot
        lo, hi = bank.coeff_range if bank.coeff_range is not None else (None, None)
        return {
            "bank_version": bank.version,
            "vectors": ",".join(bank.names),
            "policies": ",".join(bank.policies),
            "mandatory": ",".join(bank.mandatory),
            "coeff_range": "" if lo is None else f"{lo:g},{hi:g}",
            "bundle_id": self.runtime.bundle.bundle_id,
        }

    async def config(self) -> dict[str, Any]:
        """Triton's model configuration (its JSON form; the gRPC ModelConfig parses from it)."""
        spec, bank, batching = self.spec, self.runtime.snapshot, self.runtime.config.batching
        return {
            "name": self.model_name,
            "platform": "forgetrt",
            "backend": "forgetrt",
            "version_policy": {"latest": {"num_versions": 1}},
            "max_batch_size": batching.max_batch_size,
            "input": [
                {"name": spec.image_name, "data_type": "TYPE_FP32", "format": "FORMAT_NONE", "dims": list(spec.shape)},
                {"name": spec.coeffs_name, "data_type": "TYPE_FP32", "dims": [bank.k], "optional": True},
            ],
            "output": [{"name": spec.output_name, "data_type": "TYPE_FP32", "dims": [spec.num_classes]}],
            "dynamic_batching": {
                "max_queue_delay_microseconds": batching.max_queue_delay_us,
                "preserve_ordering": False,
            },
            "instance_group": [
                {
                    "name": self.model_name,
                    "kind": "KIND_GPU" if self.runtime.device == "cuda" else "KIND_CPU",
                    "count": len(self.runtime.backends),
                }
            ],
            "parameters": {k: {"string_value": str(v)} for k, v in self._bank_parameters().items()},
        }

    async def statistics(self) -> dict[str, Any]:
        return {"model_stats": [self.stats.to_dict(self.model_name, getattr(self.metrics, "executions", 0))]}

    async def exposition(self, metrics: Any) -> bytes:
        """The Prometheus text of ``metrics`` (the server's registry)."""
        from prometheus_client import generate_latest

        return generate_latest(metrics.registry)

    def count_failure(self, e: ForgetRTError, status: int, *, inference: bool = True) -> None:
        """Count a request that ended in ``e`` (answered with HTTP ``status`` or its gRPC equivalent);
        ``inference``: an inference request (also counted as failed in the model's statistics)."""
        self.count_failure_named(type(e).__name__, status, inference=inference)

    def count_failure_named(self, error: str, status: int, *, inference: bool = True, n: int = 1) -> None:
        """``count_failure`` by the error type's name, ``n`` times (front-end processes report so)."""
        if inference:
            self.stats.failed(0.0, n)
        if self.metrics is not None:
            self.metrics.requests.labels(status=str(status)).inc(n)
            self.metrics.failures.labels(error=error).inc(n)

    # ------------------------------------------------------------------ health
    async def readiness(self) -> str | None:
        """Why this model should not get traffic now (None: ready). After repeated engine failures one
        probe image is run; its success makes the model ready again."""
        if self.runtime.closed:
            return "the runtime is shut down"
        if self.admission is not None and (why := self.admission()) is not None:
            return why
        if self.health.loading:
            return f"loading bank {self.health.loading!r}"
        if self.health.engine_failures >= ENGINE_FAILURES_UNREADY:
            probe = np.full((1, *self.spec.shape), self.spec.input_range[0], np.float32)
            try:
                await self.runtime.infer_async(probe)
            except ForgetRTError as e:
                return f"the engine is failing ({self.health.engine_failures} failed batches in a row; probe: {e})"
            self.health.engine_failures = 0
        return None

    # ------------------------------------------------------------------ inference
    def _alone(self) -> bool:
        """No other request is being read, parsed or run (inline dispatch's load signal)."""
        return self.inflight == 1

    def admit(self) -> None:
        """Raise unless a new request may start (call before reading its body)."""
        if self.admission is not None and (why := self.admission()) is not None:
            raise NotAdmitted(why)
        if self.inflight >= self.limits.max_inflight:
            raise Overloaded(f"over {self.limits.max_inflight} requests in flight; retry later")

    def check_call(self, call: InferCall) -> OutputRequest:
        spec = self.spec
        images = call.images
        if images.ndim != 4:
            raise InvalidInputError(
                f"input {spec.image_name!r} must have shape [N, {', '.join(map(str, spec.shape))}], "
                f"got {list(images.shape)}"
            )
        if call.coeffs is not None:
            if call.params.forget is not None:
                raise InvalidInputError("give the composition either as the coeffs input or in parameters, not both")
            if call.coeffs.dtype != np.float32 or call.coeffs.ndim != 2:
                raise InvalidInputError(f"input {spec.coeffs_name!r} must be FP32 [N, K]")
            if call.coeffs.shape[0] != images.shape[0]:
                raise InvalidInputError(f"coeffs has {call.coeffs.shape[0]} rows for {images.shape[0]} images")
        outputs = call.outputs or [OutputRequest(spec.output_name)]
        names = [o.name for o in outputs]
        unknown = [n for n in names if n != spec.output_name]
        if unknown:
            raise InvalidInputError(f"unknown output {str(unknown[0])[:60]!r}; valid: {spec.output_name}")
        if len(names) != len(set(names)):
            raise InvalidInputError(f"output {spec.output_name!r} requested twice")
        out = outputs[0]
        if out.class_count > spec.num_classes:
            raise InvalidInputError(
                f"classification of {out.class_count} classes, but the model has {spec.num_classes}"
            )
        return out

    async def infer(self, call: InferCall, *, peer_alone: bool = True) -> InferOutcome:
        """Run one request (``admit`` must have passed); typed errors for everything a client can get wrong.
        ``peer_alone``: false when the front end that sent it has other requests under way (the process
        front ends of :mod:`.frontends`), so it is not run inline."""
        t0 = time.perf_counter()
        self.inflight += 1
        try:
            out = self.check_call(call)
            result = await self.runtime.infer_async(**_runtime_args(call), alone=self._alone if peer_alone else _never)
        except ForgetRTError as e:
            self._failed(e)
            raise
        finally:
            self.inflight -= 1
        return self._done(out, result, t0)

    def infer_now(self, call: InferCall) -> InferOutcome | None:
        """``infer`` run on the calling thread now when the runtime would run it inline
        (:meth:`Runtime.infer_now`), else None; for a caller that knows no other request is under way."""
        t0 = time.perf_counter()
        out = self.check_call(call)
        self.inflight += 1
        try:
            result = self.runtime.infer_now(**_runtime_args(call))
        except ForgetRTError as e:
            self._failed(e)
            raise
        finally:
            self.inflight -= 1
        return None if result is None else self._done(out, result, t0)

    def submit(self, call: InferCall) -> tuple[asyncio.Future, Callable[[asyncio.Future], InferOutcome]]:
        """``infer`` without a coroutine, for a caller on the event loop that answers from a callback (the
        engine side of :mod:`.frontends`, many requests per loop turn): the runtime's future, and the
        function that turns it, once done, into the outcome (or raises the request's typed error). Never
        runs inline."""
        t0 = time.perf_counter()
        out = self.check_call(call)
        fut = self.runtime.submit_async(**_runtime_args(call))
        self.inflight += 1

        def finish(f: asyncio.Future) -> InferOutcome:
            self.inflight -= 1
            try:
                result = f.result()
            except ForgetRTError as e:
                self._failed(e)
                raise
            return self._done(out, result, t0)

        return fut, finish

    def _failed(self, e: ForgetRTError) -> None:
        if isinstance(e, EngineError):
            self.health.engine_failures += 1

    def _done(self, out: OutputRequest, result: Any, t0: float) -> InferOutcome:
        self.health.engine_failures = 0
        if not np.isfinite(result.logits).all():  # e.g. a weight of 3e38 on an unbounded bundle
            raise InvalidInputError(
                "the composition's weights make the logits overflow (not finite): use smaller weights"
            )
        if self.metrics is not None:
            if self._ok_counter is None:  # labels() costs a lock and a tuple per call
                self._ok_counter = self.metrics.requests.labels(status="200")
            self._ok_counter.inc()
            if result.bank_version != self._gauge_version:
                self._gauge_version = result.bank_version
                self.metrics.bank_version.set(result.bank_version)
        logits = np.ascontiguousarray(result.logits, np.float32)
        self.stats.ok(len(logits), time.perf_counter() - t0, result.queue_us, result.compute_us)
        classes = self.classify(logits, out.class_count) if out.class_count else None
        return InferOutcome(
            self.spec.output_name, logits, classes, result.bank_version, result.queue_us, result.compute_us, out
        )

    def classify(self, logits: np.ndarray, k: int) -> np.ndarray:
        """The classification extension: per image, the top ``k`` as ``"value:index[:label]"`` (Triton's form)."""
        top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        out = np.empty(top.shape, dtype=object)
        for i, row in enumerate(top):
            for j, c in enumerate(row):
                label = f":{self.labels[c]}" if self.labels is not None else ""
                out[i, j] = f"{logits[i, c]:f}:{c}{label}".encode()
        return out

    # ------------------------------------------------------------------ bank changes
    async def load_bank(self, authorization: str | None, raw: Any, caller: str) -> dict[str, Any]:
        """Authorize, then load ``raw`` from under the bank root (off the event loop, one at a time)."""
        self.control.authorize(authorization)
        if raw is None:
            return {"name": self.model_name, "bank_version": self.runtime.snapshot.version}
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        async with self._load_lock:
            self.health.loading = str(raw)[:200]
            try:
                res = await asyncio.to_thread(self.control.load_bank, self.runtime, raw, caller)
            finally:
                self.health.loading = None
        out = {
            "name": self.model_name,
            "bank_version": res["version"],
            "vectors": res["vectors"],
            "bank": res["bank"],
            "vectors_sha256": res["vectors_sha256"],
        }
        if "replicas_confirmed" in res:
            out["replicas_confirmed"] = res["replicas_confirmed"]
        return out
