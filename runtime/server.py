"""KServe v2 / Open Inference Protocol REST server over a :class:`Runtime` (Starlette + uvicorn).

Endpoints: ``/v2/health/live``, ``/v2/health/ready``, ``/v2``, ``/v2/models/NAME``,
``/v2/models/NAME/ready``, ``POST /v2/models/NAME/infer`` (also under ``/versions/1/``),
``POST /v2/repository/index``, ``POST /v2/repository/models/NAME/load`` (hot-swap a bank:
``{"parameters": {"bank": "/path/to/bank"}}``), and Prometheus metrics at ``/metrics``.

The composition comes as a ``coeffs`` input tensor [N, K], or by name in the request's
``parameters``: ``{"forget": {"forget-3": 1.0}}`` (a mapping, a list of names, or either as a JSON
string) or ``{"policy": "eu"}``. The binary tensor data extension is supported both ways; the standard
``tritonclient.http`` client works unchanged. Every error is JSON ``{"error": "..."}``: 4xx for the
client's mistakes (429 when the queue is full, 408 past a deadline), 5xx for engine failures; the
server keeps serving after any bad request.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

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
from .runtime import Runtime, RuntimeConfig

__all__ = ["create_app", "serve", "ServerMetrics"]

log = logging.getLogger("forgetrt.server")
HEADER_LEN = "inference-header-content-length"
MAX_BODY = 256 << 20


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("forgetrt")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "0+unknown"


class ServerMetrics:
    """Prometheus metrics of one server (own registry, so several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "forgetrt_requests_total", "Inference requests by outcome", ["status"], registry=self.registry
        )
        self.failures = Counter(
            "forgetrt_request_failures_total",
            "Failed inference requests by error type",
            ["error"],
            registry=self.registry,
        )
        self.queue = Histogram(
            "forgetrt_queue_seconds",
            "Time requests wait in the dynamic batcher",
            registry=self.registry,
            buckets=(1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 1.0),
        )
        self.compute = Histogram(
            "forgetrt_compute_seconds",
            "Engine time per batch",
            registry=self.registry,
            buckets=(5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.5, 1.0),
        )
        self.batch = Histogram(
            "forgetrt_batch_images",
            "Images per engine call",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        )
        self.batch_requests = Histogram(
            "forgetrt_batch_requests",
            "Requests per engine call",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.bank_version = Gauge("forgetrt_bank_version", "Bank version being served", registry=self.registry)

    def observe_batch(self, n_requests: int, n_images: int, queue_s: Any, compute_s: float, ok: bool) -> None:
        for q in queue_s:
            self.queue.observe(q)
        self.compute.observe(compute_s)
        self.batch.observe(n_images)
        self.batch_requests.observe(n_requests)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


_STATUS = [
    (QueueFullError, 429),
    (DeadlineExceededError, 408),
    (RuntimeClosedError, 503),
    (EngineError, 500),
    (UnknownNameError, 400),
    (InvalidInputError, 400),
    (ArtifactError, 400),
    (ForgetRTError, 400),
]


def _status_for(e: ForgetRTError) -> int:
    return next(code for cls, code in _STATUS if isinstance(e, cls))


# ---------------------------------------------------------------------------------------------- parsing

_DTYPES = {
    "FP32": np.float32,
    "FP64": np.float64,
    "FP16": np.float16,
    "INT64": np.int64,
    "INT32": np.int32,
    "UINT8": np.uint8,
}


def _parse_request(body: bytes, header_len: str | None) -> tuple[dict, bytes]:
    if header_len is not None:
        try:
            n = int(header_len)
        except ValueError:
            raise InvalidInputError(f"{HEADER_LEN} must be an integer, got {header_len!r}") from None
        if not 0 < n <= len(body):
            raise InvalidInputError(f"{HEADER_LEN} is {n} but the body has {len(body)} bytes")
        head, rest = body[:n], body[n:]
    else:
        head, rest = body, b""
    try:
        req = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInputError(f"request body is not valid JSON: {e}") from None
    if not isinstance(req, dict):
        raise InvalidInputError("request body must be a JSON object")
    return req, rest


def _tensors(req: dict, binary: bytes) -> dict[str, np.ndarray]:
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInputError("request needs a non-empty 'inputs' list")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for t in inputs:
        if not isinstance(t, dict):
            raise InvalidInputError("each input must be an object with name, shape, datatype and data")
        name, shape, dtype = t.get("name"), t.get("shape"), t.get("datatype")
        if not isinstance(name, str):
            raise InvalidInputError("input without a name")
        if name in out:
            raise InvalidInputError(f"input {name!r} given twice")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise InvalidInputError(f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
        if dtype not in _DTYPES:
            raise InvalidInputError(f"input {name!r}: unsupported datatype {dtype!r}; valid: {', '.join(_DTYPES)}")
        np_dtype = _DTYPES[dtype]
        count = int(np.prod(shape)) if shape else 1
        if count > MAX_BODY // 4:
            raise InvalidInputError(f"input {name!r} is too large ({count} elements)")
        params = t.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0:
                raise InvalidInputError(f"input {name!r}: binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise InvalidInputError(
                    f"input {name!r}: binary payload truncated (needs {size} bytes at offset {offset}, body has "
                    f"{len(binary) - offset})"
                )
            if size != count * np.dtype(np_dtype).itemsize:
                raise InvalidInputError(f"input {name!r}: {size} bytes do not hold {shape} {dtype}")
            arr = np.frombuffer(binary[offset : offset + size], dtype=np_dtype).reshape(shape)
            offset += size
        else:
            data = t.get("data")
            if data is None:
                raise InvalidInputError(f"input {name!r} has neither data nor binary_data_size")
            try:
                arr = np.asarray(data, dtype=np_dtype)
            except (TypeError, ValueError) as e:
                raise InvalidInputError(f"input {name!r}: data is not {dtype}: {e}") from None
            if arr.size != count:
                raise InvalidInputError(f"input {name!r}: {arr.size} values do not fill shape {shape}")
            arr = arr.reshape(shape)
        out[name] = arr
    if offset != len(binary):
        raise InvalidInputError(f"{len(binary) - offset} unexpected trailing bytes after the binary inputs")
    return out


def _forget_param(params: Any) -> Any:
    if params is None:
        return None
    if not isinstance(params, dict):
        raise InvalidInputError("request 'parameters' must be an object")
    forget, policy = params.get("forget"), params.get("policy")
    if forget is not None and policy is not None:
        raise InvalidInputError("give 'forget' or 'policy', not both")
    if policy is not None:
        if not isinstance(policy, str):
            raise InvalidInputError("'policy' must be a string")
        return policy
    if isinstance(forget, str):
        text = forget.strip()
        if text.startswith(("{", "[")):
            try:
                forget = json.loads(text)
            except json.JSONDecodeError as e:
                raise InvalidInputError(f"'forget' is not valid JSON: {e}") from None
        else:
            forget = [s.strip() for s in text.split(",") if s.strip()]
    if forget is not None and not isinstance(forget, (dict, list)):
        raise InvalidInputError("'forget' must be a mapping name -> weight or a list of names")
    if isinstance(forget, list) and not all(isinstance(n, str) for n in forget):
        raise InvalidInputError("'forget' as a list must hold vector names")
    return forget


# ---------------------------------------------------------------------------------------------- app


def create_app(runtime: Runtime, model_name: str, *, metrics: ServerMetrics | None = None) -> Starlette:
    """The ASGI app; ``metrics`` should be the one whose ``observe_batch`` the runtime was loaded with."""
    metrics = metrics or ServerMetrics()
    spec = runtime.iospec

    def _model_or_404(request: Request) -> JSONResponse | None:
        name = request.path_params["model"]
        if name != model_name:
            return _error(404, f"unknown model {name!r}; this server serves {model_name!r}")
        version = request.path_params.get("version")
        if version is not None and version != "1":
            return _error(404, f"unknown version {version!r} of model {model_name!r}; valid: 1")
        return None

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        return JSONResponse({"ready": True})

    async def server_meta(request: Request) -> Response:
        return JSONResponse(
            {"name": "forgetrt", "version": _version(), "extensions": ["binary_tensor_data", "model_repository"]}
        )

    async def model_meta(request: Request) -> Response:
        if (err := _model_or_404(request)) is not None:
            return err
        bank = runtime.snapshot
        return JSONResponse(
            {
                "name": model_name,
                "versions": ["1"],
                "platform": f"forgetrt_{runtime.backend_name}",
                "inputs": [
                    {"name": spec.image_name, "datatype": "FP32", "shape": [-1, *spec.shape]},
                    {"name": spec.coeffs_name, "datatype": "FP32", "shape": [-1, bank.k]},
                ],
                "outputs": [{"name": spec.output_name, "datatype": "FP32", "shape": [-1, spec.num_classes]}],
                "parameters": {
                    "bank_version": bank.version,
                    "vectors": ",".join(bank.names),
                    "policies": ",".join(bank.policies),
                    "mandatory": ",".join(bank.mandatory),
                    "bundle_id": runtime.bundle.bundle_id,
                },
            }
        )

    async def model_ready(request: Request) -> Response:
        if (err := _model_or_404(request)) is not None:
            return err
        return JSONResponse({"name": model_name, "ready": True})

    async def infer(request: Request) -> Response:
        if (err := _model_or_404(request)) is not None:
            return err
        t0 = time.perf_counter()
        try:
            body = await request.body()
            if len(body) > MAX_BODY:
                raise InvalidInputError(f"request body over {MAX_BODY} bytes")
            req, binary = _parse_request(body, request.headers.get(HEADER_LEN))
            tensors = _tensors(req, binary)
            unknown_inputs = sorted(set(tensors) - {spec.image_name, spec.coeffs_name})
            if unknown_inputs:
                raise InvalidInputError(
                    f"unknown inputs {unknown_inputs}; valid: {spec.image_name}, {spec.coeffs_name}"
                )
            if spec.image_name not in tensors:
                raise InvalidInputError(f"input {spec.image_name!r} is required")
            forget = _forget_param(req.get("parameters"))
            coeffs = tensors.get(spec.coeffs_name)
            if coeffs is not None:
                if forget is not None:
                    raise InvalidInputError(
                        "give the composition either as the coeffs input or in parameters, not both"
                    )
                if coeffs.dtype != np.float32 or coeffs.ndim != 2:
                    raise InvalidInputError(f"input {spec.coeffs_name!r} must be FP32 [N, K]")
            images = tensors[spec.image_name]
            if images.ndim != 4:
                raise InvalidInputError(
                    f"input {spec.image_name!r} must have shape [N, {', '.join(map(str, spec.shape))}], got "
                    f"{list(images.shape)}"
                )
            if coeffs is not None and coeffs.shape[0] != images.shape[0]:
                raise InvalidInputError(f"coeffs has {coeffs.shape[0]} rows for {images.shape[0]} images")
            result = await runtime.infer_async(images, forget, coeffs=coeffs)
        except ForgetRTError as e:
            status = _status_for(e)
            metrics.requests.labels(status=str(status)).inc()
            metrics.failures.labels(error=type(e).__name__).inc()
            return _error(status, str(e))
        outputs_req = req.get("outputs") or []
        binary_out = any(
            isinstance(o, dict) and (o.get("parameters") or {}).get("binary_data") for o in outputs_req
        ) or bool((req.get("parameters") or {}).get("binary_data_output"))
        logits = np.ascontiguousarray(result.logits, np.float32)
        out = {"name": spec.output_name, "datatype": "FP32", "shape": list(logits.shape)}
        resp: dict[str, Any] = {
            "model_name": model_name,
            "model_version": "1",
            "parameters": {
                "bank_version": result.bank_version,
                "queue_us": round(result.queue_us, 1),
                "compute_us": round(result.compute_us, 1),
            },
            "outputs": [out],
        }
        if "id" in req:
            resp["id"] = req["id"]
        metrics.requests.labels(status="200").inc()
        metrics.bank_version.set(runtime.snapshot.version)
        if binary_out:
            raw = logits.tobytes()
            out["parameters"] = {"binary_data_size": len(raw)}
            head = json.dumps(resp).encode()
            return Response(head + raw, media_type="application/octet-stream", headers={HEADER_LEN: str(len(head))})
        out["data"] = logits.reshape(-1).tolist()
        log.debug("infer %d images in %.2f ms", len(logits), 1e3 * (time.perf_counter() - t0))
        return JSONResponse(resp)

    async def repo_index(request: Request) -> Response:
        return JSONResponse([{"name": model_name, "version": "1", "state": "READY"}])

    async def repo_load(request: Request) -> Response:
        if (err := _model_or_404(request)) is not None:
            return err
        try:
            body = await request.body()
            req = json.loads(body) if body else {}
            params = req.get("parameters") or {} if isinstance(req, dict) else {}
            bank = params.get("bank")
            if bank is None:
                return JSONResponse({"name": model_name, "bank_version": runtime.snapshot.version})
            if not isinstance(bank, str):
                raise InvalidInputError("parameters.bank must be a path string")
            state = runtime.reload_bank(bank)
        except json.JSONDecodeError as e:
            return _error(400, f"request body is not valid JSON: {e}")
        except ForgetRTError as e:
            return _error(_status_for(e), str(e))
        metrics.bank_version.set(state.version)
        return JSONResponse({"name": model_name, "bank_version": state.version, "vectors": list(state.names)})

    async def prom(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2", server_meta),
        Route("/v2/models/{model}", model_meta),
        Route("/v2/models/{model}/versions/{version}", model_meta),
        Route("/v2/models/{model}/ready", model_ready),
        Route("/v2/models/{model}/versions/{version}/ready", model_ready),
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/v2/repository/index", repo_index, methods=["POST"]),
        Route("/v2/repository/models/{model}/load", repo_load, methods=["POST"]),
        Route("/metrics", prom),
    ]
    return Starlette(routes=routes)


def serve(
    bundle: str,
    config: RuntimeConfig = RuntimeConfig(),
    backend_options: Any = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    log_level: str = "info",
) -> None:
    """Load the bundle and serve it until interrupted (blocking)."""
    import uvicorn

    metrics = ServerMetrics()
    runtime = Runtime.load(bundle, config, backend_options, observer=metrics.observe_batch)
    name = model_name or Path(bundle).resolve().name
    app = create_app(runtime, name, metrics=metrics)
    log.info("serving %s as model %r on http://%s:%d (backend %s)", bundle, name, host, port, runtime.backend_name)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        runtime.close()
