"""KServe v2 / Open Inference Protocol REST server over a :class:`Runtime` (Starlette + uvicorn).

Endpoints: ``/v2/health/live``, ``/v2/health/ready``, ``/v2``, ``/v2/models/NAME``,
``/v2/models/NAME/ready``, ``POST /v2/models/NAME/infer`` (also under ``/versions/1/``),
``POST /v2/repository/index``, ``POST /v2/repository/models/NAME/load`` (hot-swap a bank:
``{"parameters": {"bank": "NAME"}}``, a folder under the bank root; needs the admin token, see
:mod:`forgetrt.runtime.control`), and Prometheus metrics at ``/metrics``.

Bounded (:class:`ServerLimits`): a body over the limit is refused with 413 from its Content-Length,
before it is read, and a streamed body stops at the limit; headers and bodies have time limits (408);
connections are capped; JSON nesting is bounded; when more requests are in flight than the limit, new
ones get 429 before their body is read; JSON bodies of 1 MiB or more are parsed (and large answers
encoded) in a spawned worker process (``ServerLimits.parse_workers``), off the event loop and its GIL, so a
script that builds the app must do so under ``if __name__ == "__main__":`` (or use ``parse_workers=0``).

The composition comes as a ``coeffs`` input tensor [N, K], or by name in the request's
``parameters``: ``{"forget": {"forget-3": 1.0}}`` (a mapping, a list of names, or either as a JSON
string) or ``{"policy": "eu"}``. The binary tensor data extension is supported both ways; the standard
``tritonclient.http`` client works unchanged. Every error is JSON ``{"error": "..."}``: 4xx for the
client's mistakes (429 when the queue is full, 408 past a deadline, 413 too large), 5xx for engine
failures; every response, failures included, is counted in ``/metrics``; the server keeps serving after
any bad request. The two inference routes are served on ASGI directly, ahead of Starlette (the hot path:
no routing table, request or response objects); every other route is Starlette's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .control import ControlPlane
from .errors import ForgetRTError, InvalidInputError
from .limits import ServerLimits
from .runtime import Runtime, RuntimeConfig
from .service import (
    EXTENSIONS,
    BodyTimeout,
    InferCall,
    ModelService,
    TooLarge,
    UnknownModel,
    WorkerLost,
    parse_output_parameters,
    parse_request_parameters,
    status_for,
)

__all__ = ["create_app", "serve", "ServerMetrics", "ServerLimits", "uvicorn_config"]

log = logging.getLogger("forgetrt.server")
HEADER_LEN = "inference-header-content-length"
#: JSON this large or larger is parsed (and logits this many or more are encoded) in a worker process:
#: Python's json holds the GIL, so on a thread it would still stall every other client
OFFLOAD_BYTES = 1 << 20
OFFLOAD_VALUES = 1 << 16


class _Offloader:
    """Runs the pure-Python work of large bodies (JSON parsing, array building, JSON encoding) in
    ``workers`` spawned processes, so the event loop keeps serving other clients meanwhile; with 0 workers
    it runs on a thread (the GIL is then held for the whole parse). Created on first use."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: Any = None
        self._lock = threading.Lock()
        self.jobs = 0  # how many ran in a worker (for tests and debugging)

    def _get(self) -> Any:
        with self._lock:
            if self._pool is None:
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor

                # spawn: the server process holds engine threads, which fork would copy half-alive
                self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
            return self._pool

    def start(self) -> None:
        """Spawn the workers now (a server calls this at startup, so the first large body does not pay it)."""
        if self.workers:
            self._get().submit(int)

    async def run(self, fn: Any, *args: Any) -> Any:
        if self.workers == 0:
            return await asyncio.to_thread(fn, *args)
        from concurrent.futures.process import BrokenProcessPool

        pool = self._get()
        self.jobs += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise WorkerLost("the worker parsing this request died (out of memory?); retry it") from None

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


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
        self.executions = 0  # engine calls (Triton's execution_count)
        self.bank_version = Gauge("forgetrt_bank_version", "Bank version being served", registry=self.registry)
        self.responses = Counter(
            "forgetrt_http_responses_total",
            "Every HTTP response, by route and status (errors included)",
            ["route", "status"],
            registry=self.registry,
        )

    def observe_batch(self, n_requests: int, n_images: int, queue_s: Any, compute_s: float, ok: bool) -> None:
        self.executions += 1
        for q in queue_s:
            self.queue.observe(q)
        self.compute.observe(compute_s)
        self.batch.observe(n_images)
        self.batch_requests.observe(n_requests)


def _json(obj: Any) -> bytes:
    """Compact JSON, ASCII only (a lone surrogate from a client's string cannot break the encoding)."""
    return json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def _error(status: int, message: str, headers: dict[str, str] | None = None, *, close: bool = False) -> Response:
    """A JSON error; ``close``: close the connection once answered (the rest of its body is not read)."""
    headers = {**(headers or {}), "connection": "close"} if close else headers
    return Response(_json({"error": message}), status_code=status, headers=headers, media_type="application/json")


# ---------------------------------------------------------------------------------------------- parsing

_DTYPES = {
    "FP32": np.float32,
    "FP64": np.float64,
    "FP16": np.float16,
    "INT64": np.int64,
    "INT32": np.int32,
    "UINT8": np.uint8,
}


#: a whole JSON string (escapes included) or one bracket: the scan below skips strings in C
_JSON_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.S)


def _json_depth_ok(text: str, limit: int) -> bool:
    """Whether the nesting of brackets outside strings stays within ``limit``, before the parser recurses."""
    if text.count("[") + text.count("{") <= limit:  # fewer openings than the limit: no nesting can exceed it
        return True
    depth = 0
    for m in _JSON_TOKENS.finditer(text):
        ch = m.group()
        if ch == "[" or ch == "{":
            depth += 1
            if depth > limit:
                return False
        elif ch == "]" or ch == "}":
            depth -= 1
    return True


def _json_bytes(body: bytes, header_len: str | None) -> int:
    """How many bytes of the body are JSON (all of it, or the binary extension's header)."""
    try:
        return len(body) if header_len is None else min(len(body), max(0, int(header_len)))
    except ValueError:
        return len(body)


def _encode_json(resp: dict, data: np.ndarray) -> bytes:
    """The JSON response with ``data`` as its output's data (what JSONResponse would render)."""
    flat = data.reshape(-1)
    resp["outputs"][0]["data"] = [v.decode() for v in flat] if data.dtype == object else flat.tolist()
    return _json(resp)


def _bytes_tensor(data: np.ndarray) -> bytes:
    """The binary form of a BYTES tensor: each element as a 4-byte little-endian length and its bytes."""
    return b"".join(len(v).to_bytes(4, "little") + v for v in data.reshape(-1))


def _parse_request(body: bytes, header_len: str | None, max_depth: int = 64) -> tuple[dict, bytes]:
    if header_len is not None:
        if not re.fullmatch(r"[0-9]{1,12}", header_len):
            raise InvalidInputError(f"{HEADER_LEN} must be a decimal integer, got {header_len[:40]!r}")
        n = int(header_len)
        if not 0 < n <= len(body):
            raise InvalidInputError(f"{HEADER_LEN} is {n} but the body has {len(body)} bytes")
        head, rest = body[:n], body[n:]
    else:
        head, rest = body, b""
    try:  # JSON on the wire is UTF-8 (RFC 8259); other encodings would also hide brackets from the scan
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"request JSON must be UTF-8: {str(e)[:200]}") from None
    if not _json_depth_ok(text, max_depth):
        raise InvalidInputError(f"request JSON is nested deeper than {max_depth} levels")
    try:
        req = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        raise InvalidInputError(f"request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(req, dict):
        raise InvalidInputError("request body must be a JSON object")
    return req, rest


def _tensors(req: dict, binary: bytes, max_elements: int) -> dict[str, np.ndarray]:
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInputError("request needs a non-empty 'inputs' list")
    if len(inputs) > 8:
        raise InvalidInputError(f"request has {len(inputs)} inputs; this model takes at most 2")
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
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)
            or len(shape) > 8
        ):
            raise InvalidInputError(
                f"input {name!r}: shape must be a list of at most 8 dimensions in [0, 2^31), got {str(shape)[:100]}"
            )
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise InvalidInputError(
                f"input {name!r}: unsupported datatype {str(dtype)[:40]!r}; valid: {', '.join(_DTYPES)}"
            )
        np_dtype = _DTYPES[dtype]
        count = math.prod(shape)  # Python ints: no overflow
        if count > max_elements or math.prod(d for d in shape if d) > max_elements:  # an empty [0, 2^31, 2^31] too
            raise TooLarge(f"input {name!r} has shape {shape}, more than a request body can hold here")
        params = t.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInputError(f"input {name!r}: parameters must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
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
                arr = np.asarray(data)
                # numbers only: numpy would also turn "0.5" or true into FP32, and 0.5 into INT32 (as 0)
                if arr.dtype.kind not in ("f", "i", "u") or (np.dtype(np_dtype).kind in "iu" and arr.dtype.kind == "f"):
                    raise TypeError(f"values of the wrong kind ({arr.dtype.kind!r} data)")
                arr = _cast_checked(arr, np.dtype(np_dtype))
            except (TypeError, ValueError, OverflowError, FloatingPointError) as e:
                raise InvalidInputError(f"input {name!r}: data is not {dtype}: {str(e)[:200]}") from None
            if arr.size != count:
                raise InvalidInputError(f"input {name!r}: {arr.size} values do not fill shape {shape}")
            arr = arr.reshape(shape)
        out[name] = arr
    if offset != len(binary):
        raise InvalidInputError(f"{len(binary) - offset} unexpected trailing bytes after the binary inputs")
    return out


def _cast_checked(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``arr`` as ``dtype``, refusing values the type cannot hold (numpy would wrap or overflow silently)."""
    if dtype.kind in "iu" and arr.size:
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise OverflowError(f"values outside [{info.min}, {info.max}]")
    with np.errstate(over="ignore"):
        out = arr.astype(dtype)
    if dtype.kind == "f" and arr.dtype.kind == "f" and arr.size and not np.isfinite(out).all():
        if np.isfinite(arr).all():
            raise OverflowError(f"values beyond the range of {dtype.name}")
    return out


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (\ud800) are valid JSON escapes but not text
        return False
    return True


def _parse_infer(body: bytes, header_len: str | None, spec, limits: ServerLimits) -> InferCall:
    """Everything a request says, validated (runs in a worker process for large bodies)."""
    req, binary = _parse_request(body, header_len, limits.max_json_depth)
    tensors = _tensors(req, binary, limits.max_body_bytes)
    unknown_inputs = sorted(set(tensors) - {spec.image_name, spec.coeffs_name})
    if unknown_inputs:
        raise InvalidInputError(f"unknown inputs {unknown_inputs}; valid: {spec.image_name}, {spec.coeffs_name}")
    if spec.image_name not in tensors:
        raise InvalidInputError(f"input {spec.image_name!r} is required")
    rid = req.get("id")
    if rid is not None and (not isinstance(rid, str) or not _is_unicode(rid) or len(rid) > 1024):
        raise InvalidInputError("'id' must be a string of valid Unicode, at most 1024 characters")
    params = parse_request_parameters(req.get("parameters"))
    outputs = req.get("outputs")
    requested = None
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
            raise InvalidInputError("'outputs' must be a list of objects")
        requested = []
        for o in outputs:
            if not isinstance(o.get("name"), str):
                raise InvalidInputError("each requested output needs a name")
            requested.append(parse_output_parameters(o["name"], o.get("parameters")))
    return InferCall(tensors[spec.image_name], tensors.get(spec.coeffs_name), params, requested, rid)


async def _read_body(request: Request, limits: ServerLimits) -> bytes:
    """:func:`_read_asgi_body` for a Starlette request."""
    return await _read_asgi_body(request.headers.get("content-length"), request.receive, limits)


async def _read_asgi_body(declared: str | None, receive: Callable, limits: ServerLimits) -> bytes:
    """The body, refused from its Content-Length (``declared``) if that is over the limit (before reading
    anything), cut off at the limit while streaming, and within the body time limit."""
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise InvalidInputError("Content-Length must be an integer") from None
        if n > limits.max_body_bytes:
            raise TooLarge(f"request body of {n} bytes is over the limit of {limits.max_body_bytes}")
    chunks, size = [], 0

    async def read() -> None:
        nonlocal size
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            if message["type"] != "http.request":
                continue
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise TooLarge(f"request body is over the limit of {limits.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return

    try:
        if hasattr(asyncio, "timeout"):  # Python 3.11+: a deadline on this task, no extra task per request
            async with asyncio.timeout(limits.body_timeout_s):
                await read()
        else:  # pragma: no cover - Python 3.10
            await asyncio.wait_for(read(), limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise BodyTimeout(f"the request body did not arrive within {limits.body_timeout_s:g} s") from None
    except ClientDisconnect:
        raise InvalidInputError("the client disconnected before sending the whole body") from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# ---------------------------------------------------------------------------------------------- app


class _Counted:
    """ASGI middleware: every response is counted by route and status, and an exception nobody handled
    becomes a JSON 500 (counted too) instead of a plain-text one. With ``instance``, every response the app
    sends (errors and refusals included) names the server that gave it in ``x-forgetrt-instance``; answers
    the HTTP server or a proxy in front makes itself (a malformed request line, a proxy's backpressure 503)
    never reach the app and carry no such header."""

    def __init__(self, app, metrics: ServerMetrics, instance: str | None = None) -> None:
        self.app, self.metrics = app, metrics
        self._children: dict[tuple[str, int], Any] = {}  # at most routes x statuses entries
        self._instance = (INSTANCE_HEADER.encode(), instance.encode("latin-1")) if instance else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500, "sent": False}

        async def counted_send(message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
                if self._instance is not None:
                    message = {**message, "headers": [*message.get("headers", ()), self._instance]}
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        except Exception:  # noqa: BLE001 - the last line of defence: never a plain-text 500
            log.exception("unhandled error on %s", scope.get("path"))
            if not status["sent"]:
                await _error(500, "internal server error")(scope, receive, counted_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            key = (path, status["code"])
            if (counter := self._children.get(key)) is None:  # labels() costs a lock and a tuple build per call
                counter = self._children[key] = self.metrics.responses.labels(route=path, status=str(key[1]))
            counter.inc()


INSTANCE_HEADER = "x-forgetrt-instance"
#: Content-Encoding values a request body may use (the body limit applies to the decoded size too)
ENCODINGS = ("gzip", "deflate", "identity")


def _decode_body(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The request body with its Content-Encoding undone (every gzip member; the stream must be complete
    and nothing may follow it), refused once it inflates past ``limit``. CPU-bound: called off the loop."""
    enc = (encoding or "identity").strip().lower()
    if enc == "identity":
        return body
    if enc not in ENCODINGS:
        raise InvalidInputError(f"unsupported Content-Encoding {enc[:40]!r}; valid: {', '.join(ENCODINGS)}")
    import zlib

    wbits = zlib.MAX_WBITS | 16 if enc == "gzip" else zlib.MAX_WBITS
    out, rest = bytearray(), body
    try:
        while True:
            d = zlib.decompressobj(wbits)
            out += d.decompress(rest, limit + 1 - len(out))
            if len(out) > limit or d.unconsumed_tail:
                raise TooLarge(f"the request body inflates past the limit of {limit} bytes")
            out += d.flush()
            if not d.eof:
                raise InvalidInputError(f"the request body is a truncated {enc} stream")
            rest = d.unused_data
            if not rest:
                break
            if enc != "gzip":
                raise InvalidInputError(f"{len(rest)} bytes follow the {enc} stream")
    except zlib.error as e:
        raise InvalidInputError(f"the request body is not valid {enc}: {str(e)[:120]}") from None
    if len(out) > limit:
        raise TooLarge(f"the request body inflates past the limit of {limit} bytes")
    return bytes(out)


_HEADER_LEN_B = HEADER_LEN.encode()
_OCTET_STREAM = b"application/octet-stream"
_APPLICATION_JSON = b"application/json"


async def _send_ok(send, body: bytes, media_type: bytes, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """A 200 answer on ASGI directly (what a Starlette Response sends, without building one)."""
    head = [(b"content-length", str(len(body)).encode()), (b"content-type", media_type), *headers]
    await send({"type": "http.response.start", "status": 200, "headers": head})
    await send({"type": "http.response.body", "body": body})


class _Route:
    """What ``scope["route"]`` holds for the inference routes (its ``path`` labels the response counter)."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path


_INFER = _Route("/v2/models/{model}/infer")
_INFER_VERSION = _Route("/v2/models/{model}/versions/{version}/infer")


class _InferRoutes:
    """ASGI: ``/v2/models/NAME/infer`` and ``/v2/models/NAME/versions/V/infer`` go straight to the
    inference handler, without Starlette's middleware, routing, request and response objects (about a
    tenth of a front end's CPU per request); every other path goes to ``app``. Matching is Starlette's:
    a name is one non-empty path segment, nothing may follow ``infer``, and the path is taken after the
    scope's ``root_path`` when it starts with it; methods other than POST get a JSON 405 with ``Allow: POST``.
    (Unlike Starlette's ``$``, a final newline in the path is not ignored: ``.../infer%0A`` is a 404.)"""

    def __init__(self, app: Starlette, handler: Callable) -> None:
        self.app, self.handler = app, handler
        self.state = app.state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            path, root = scope["path"], scope.get("root_path")
            if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("/", ""):
                path = path[len(root) :]  # mounted under a prefix: match what follows it, as Starlette does
            parts = path.split("/")
            n = len(parts)
            if (
                (n == 5 or (n == 7 and parts[4] == "versions" and parts[5]))
                and parts[-1] == "infer"
                and parts[3]
                and parts[2] == "models"
                and parts[1] == "v2"
                and not parts[0]
            ):
                scope["route"] = _INFER if n == 5 else _INFER_VERSION
                if scope["method"] != "POST":
                    return await _error(405, "Method Not Allowed", {"Allow": "POST"})(scope, receive, send)
                return await self.handler(scope, receive, send, parts[3], parts[5] if n == 7 else None)
        await self.app(scope, receive, send)


def create_app(
    runtime: Runtime | None,
    model_name: str,
    *,
    metrics: ServerMetrics | None = None,
    limits: ServerLimits = ServerLimits(),
    control: ControlPlane = ControlPlane(),
    admission: Callable[[], str | None] | None = None,
    instance: str | None = None,
    service: ModelService | None = None,
) -> Starlette:
    """The ASGI app; ``metrics`` should be the one whose ``observe_batch`` the runtime was loaded with.
    With an enabled ``control`` plane, the bank its state file names is restored first (or this raises).
    ``admission``: called before each inference and readiness check; a reason (str) refuses the request
    with 503 and makes the server unready (a cluster replica uses it to stop serving a stale bank).
    ``instance``: this server's id among several (a replica), sent as ``x-forgetrt-instance`` with each answer.
    ``service``: the :class:`ModelService` to share with another front end (gRPC); made here if not given.
    ``runtime`` None: ``service`` runs the model elsewhere (a front-end process of :mod:`.frontends`),
    which restores the control plane's bank itself."""
    metrics = metrics or ServerMetrics()
    if runtime is not None:
        restored = control.restore(runtime)
        if restored:
            log.info("control plane: restored bank %s (%s…)", restored["bank"], restored["vectors_sha256"][:12])
    elif service is None:
        raise InvalidInputError("create_app needs a runtime or a service")
    svc = service or ModelService(
        runtime, model_name, limits=limits, control=control, admission=admission, instance=instance, metrics=metrics
    )
    spec = svc.spec
    offload = _Offloader(limits.parse_workers)

    def _model_or_404(request: Request) -> JSONResponse | None:
        try:
            svc.check_model(request.path_params["model"], request.path_params.get("version"))
        except UnknownModel as e:
            return _error(404, str(e))
        return None

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        why = await svc.readiness()
        if why is not None:
            return JSONResponse({"ready": False, "reason": why}, status_code=503)
        return JSONResponse({"ready": True})

    async def server_meta(request: Request) -> Response:
        return JSONResponse({"name": "forgetrt", "version": _version(), "extensions": list(EXTENSIONS)})

    async def model_meta(request: Request) -> Response:
        if (err := _model_or_404(request)) is not None:
            return err
        return JSONResponse(await svc.metadata())

    async def model_config(request: Request) -> Response:
        if (err := _model_or_404(request)) is not None:
            return err
        return JSONResponse(await svc.config())

    async def model_stats(request: Request) -> Response:
        if "model" in request.path_params and (err := _model_or_404(request)) is not None:
            return err
        return JSONResponse(await svc.statistics())

    async def model_ready(request: Request) -> Response:
        if (err := _model_or_404(request)) is not None:
            return err
        why = await svc.readiness()
        if why is not None:
            return JSONResponse({"name": model_name, "ready": False, "reason": why}, status_code=503)
        return JSONResponse({"name": model_name, "ready": True})

    def _failed(e: ForgetRTError) -> JSONResponse:
        status = status_for(e)
        svc.count_failure(e, status)
        return _error(status, str(e), close=isinstance(e, (TooLarge, BodyTimeout)))

    async def infer(scope, receive, send, model: str, version: str | None) -> None:
        """POST .../infer, on ASGI directly (see :class:`_InferRoutes`)."""
        try:
            svc.check_model(model, version)
        except UnknownModel as e:
            return await _error(404, str(e))(scope, receive, send)
        try:
            svc.admit()
        except ForgetRTError as e:
            return await _failed(e)(scope, receive, send)
        declared = encoding = header_len = None
        for k, v in scope["headers"]:  # the first of each, as Starlette's Headers.get
            if k == b"content-length":
                declared = v.decode("latin-1") if declared is None else declared
            elif k == b"content-encoding":
                encoding = v.decode("latin-1") if encoding is None else encoding
            elif k == _HEADER_LEN_B:
                header_len = v.decode("latin-1") if header_len is None else header_len
        svc.inflight += 1  # reading and parsing count as in flight too
        t0 = time.perf_counter()
        try:
            body = await _read_asgi_body(declared, receive, limits)
            if encoding is not None and encoding.strip().lower() != "identity":  # inflating is CPU work
                body = await asyncio.to_thread(_decode_body, body, encoding, limits.max_body_bytes)
            if _json_bytes(body, header_len) >= OFFLOAD_BYTES:  # big JSON is parsed off the event loop
                call = await offload.run(_parse_infer, body, header_len, spec, limits)
            else:
                call = _parse_infer(body, header_len, spec, limits)
        except ForgetRTError as e:
            return await _failed(e)(scope, receive, send)
        finally:
            svc.inflight -= 1
        try:
            outcome = await svc.infer(call)
        except ForgetRTError as e:
            return await _failed(e)(scope, receive, send)
        req_out = outcome.request
        data = outcome.classes if outcome.classes is not None else outcome.logits
        out: dict[str, Any] = {
            "name": outcome.output_name,
            "datatype": "BYTES" if outcome.classes is not None else "FP32",
            "shape": list(data.shape),
        }
        resp: dict[str, Any] = {
            "model_name": model_name,
            "model_version": "1",
            "parameters": {
                "bank_version": outcome.bank_version,
                "queue_us": round(outcome.queue_us, 1),
                "compute_us": round(outcome.compute_us, 1),
            },
            "outputs": [out],
        }
        if call.request_id is not None:
            resp["id"] = call.request_id
        binary = req_out.binary if req_out.binary is not None else bool(call.params.binary_data_output)
        if binary:
            raw = _bytes_tensor(data) if data.dtype == object else data.tobytes()
            out["parameters"] = {"binary_data_size": len(raw)}
            head = json.dumps(resp).encode()
            return await _send_ok(send, head + raw, _OCTET_STREAM, [(_HEADER_LEN_B, str(len(head)).encode())])
        log.debug("infer %d images in %.2f ms", len(outcome.logits), 1e3 * (time.perf_counter() - t0))
        if data.size >= OFFLOAD_VALUES:
            try:
                encoded = await offload.run(_encode_json, resp, data)
            except WorkerLost as e:
                return await _failed(e)(scope, receive, send)
            return await _send_ok(send, encoded, _APPLICATION_JSON)
        return await _send_ok(send, _encode_json(resp, data), _APPLICATION_JSON)

    async def repo_index(request: Request) -> Response:
        return JSONResponse([{"name": model_name, "version": "1", "state": "READY"}])

    async def repo_load(request: Request) -> Response:
        if (err := _model_or_404(request)) is not None:
            return err
        try:
            svc.control.authorize(request.headers.get("authorization"))  # before reading anything
            body = await _read_body(
                request, ServerLimits(max_body_bytes=64 << 10, body_timeout_s=limits.body_timeout_s)
            )
            req, _ = _parse_request(body or b"{}", None, 8)
            params = req.get("parameters", {})
            if not isinstance(params, dict):
                raise InvalidInputError("'parameters' must be an object")
            client = request.client
            caller = f"{client.host}:{client.port}" if client else "unknown"
            res = await svc.load_bank(request.headers.get("authorization"), params.get("bank"), caller)
        except ForgetRTError as e:
            status = status_for(e)
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            return _error(status, str(e), headers, close=isinstance(e, (TooLarge, BodyTimeout)))
        return JSONResponse(res)

    async def prom(request: Request) -> Response:
        return Response(await svc.exposition(metrics), media_type=CONTENT_TYPE_LATEST)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("unhandled %s on %s: %s", type(exc).__name__, request.url.path, exc)
        return _error(500, "internal server error")

    routes = [  # (the inference routes are served before Starlette: _InferRoutes)
        Route("/v2/models/stats", model_stats),  # before /v2/models/{model}, which would take 'stats' as a name
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2", server_meta),
        Route("/v2/models/{model}", model_meta),
        Route("/v2/models/{model}/versions/{version}", model_meta),
        Route("/v2/models/{model}/ready", model_ready),
        Route("/v2/models/{model}/versions/{version}/ready", model_ready),
        Route("/v2/models/{model}/config", model_config),
        Route("/v2/models/{model}/versions/{version}/config", model_config),
        Route("/v2/models/{model}/stats", model_stats),
        Route("/v2/models/{model}/versions/{version}/stats", model_stats),
        Route("/v2/repository/index", repo_index, methods=["POST"]),
        Route("/v2/repository/models/{model}/load", repo_load, methods=["POST"]),
        Route("/metrics", prom),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await asyncio.to_thread(offload.start)
        yield
        await asyncio.to_thread(offload.close)

    app = Starlette(
        routes=routes, exception_handlers={HTTPException: http_error, Exception: internal_error}, lifespan=lifespan
    )
    app.router.redirect_slashes = False  # no 307 to a client-named Host: a trailing slash is a JSON 404
    app.state.offload = offload
    app.state.service = svc
    return _Counted(_InferRoutes(app, infer), metrics, instance)  # type: ignore[return-value]


HTTP_IMPLEMENTATIONS = ("auto", "httptools", "h11")
EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def _loop_factory(loop: str):
    """The event loop a server runs on: uvloop (libuv) when asked or, for auto, when installed; else asyncio's."""
    if loop not in EVENT_LOOPS:
        raise InvalidInputError(f"unknown event loop {loop!r}; valid: {', '.join(EVENT_LOOPS)}")
    if loop in ("auto", "uvloop"):
        try:
            import uvloop

            return uvloop.new_event_loop
        except ImportError:
            if loop == "uvloop":
                raise InvalidInputError("--loop uvloop: uvloop is not installed") from None
    return asyncio.new_event_loop


def _httptools_available() -> bool:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return False
    return True


def _guarded_protocol(limits: ServerLimits, metrics: ServerMetrics | None = None, impl: str = "auto"):
    """uvicorn's HTTP/1.1 protocol (httptools' C parser when installed, else h11's pure-Python one) with a
    header time limit, a header size limit and a connection cap (uvicorn's httptools protocol has none of
    them, its h11 one only the size): a connection that has not completed a request's headers within
    ``header_timeout_s`` (from connecting, or from its previous response) is closed, request headers
    (URL included) over ``max_header_bytes`` get a JSON 400, a connection over ``max_connections`` gets a
    503 and is closed, and every malformed request a JSON 400."""
    if impl not in HTTP_IMPLEMENTATIONS:
        raise InvalidInputError(f"unknown HTTP implementation {impl!r}; valid: {', '.join(HTTP_IMPLEMENTATIONS)}")
    use_httptools = impl == "httptools" or (impl == "auto" and _httptools_available())
    if use_httptools:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]

    busy = (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: 40\r\n\r\n" + b'{"error": "too many open connections"}'.ljust(40)
    )

    class GuardedProtocol(Base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_timer = None
            self._head_bytes = 0
            self._head_too_big = False
            if len(self.connections) > limits.max_connections:
                if metrics is not None:
                    metrics.responses.labels(route="(connection cap)", status="503").inc()
                transport.write(busy)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(limits.header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if getattr(self, "_header_timer", None) is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        if use_httptools:

            def on_message_begin(self) -> None:
                super().on_message_begin()
                self._head_bytes = 0
                self._in_head = True

            def data_received(self, data: bytes) -> None:
                super().data_received(data)
                # httptools reports a header only once its line is complete: count the raw bytes of a head
                # that is still incomplete after this chunk (all of the chunk is head then)
                if getattr(self, "_in_head", True) and not self.transport.is_closing():
                    self._head_raw = getattr(self, "_head_raw", 0) + len(data)
                    if self._head_raw > limits.max_header_bytes:
                        self._head_too_big = True
                        self.send_400_response("request headers too large")

            def _count(self, n: int) -> None:
                self._head_bytes += n
                if self._head_bytes > limits.max_header_bytes:
                    self._head_too_big = True
                    raise ValueError("request headers too large")  # the parser stops: a 400 below

            def on_url(self, url: bytes) -> None:
                self._count(len(url))
                super().on_url(url)

            def on_header(self, name: bytes, value: bytes) -> None:
                self._count(len(name) + len(value) + 4)
                super().on_header(name, value)

            def on_headers_complete(self) -> None:
                self._disarm()  # a request's headers arrived
                self._in_head, self._head_raw = False, 0
                super().on_headers_complete()

        else:

            def handle_events(self) -> None:
                before = self.cycle
                super().handle_events()
                if self.cycle is not before:  # a request's headers arrived
                    self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # the next request's headers get the same time, unless a pipelined one already started
            cycle = getattr(self, "cycle", None)
            if not self.transport.is_closing() and (cycle is None or cycle.response_complete):
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:  # malformed HTTP (bad request line, oversized headers)
            if metrics is not None:
                metrics.responses.labels(route="(malformed HTTP)", status="400").inc()
            if self._head_too_big:
                msg = f"request headers over the limit of {limits.max_header_bytes} bytes"
            body = json.dumps({"error": f"malformed HTTP request: {msg}"}).encode()
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\n"
                + f"content-length: {len(body)}\r\n\r\n".encode()
                + body
            )
            self.transport.close()

    GuardedProtocol.__name__ = "GuardedHttpToolsProtocol" if use_httptools else "GuardedH11Protocol"
    return GuardedProtocol


def uvicorn_config(
    app,
    limits: ServerLimits = ServerLimits(),
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    http: str = "auto",
    access_log: bool = False,
):
    """The uvicorn configuration that enforces ``limits`` (header size, keep-alive, the guarded protocol)
    with the ``http`` implementation (auto: httptools when installed, else h11). ``access_log``: uvicorn's
    line per request at INFO (off by default: it costs each request a formatted write; /metrics counts
    every response)."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        log_config=None,  # the process's logging (forgetrt --log-level/--log-format) stays in charge
        http=_guarded_protocol(limits, getattr(app, "metrics", None), http),
        timeout_keep_alive=int(math.ceil(limits.keep_alive_s)),
        h11_max_incomplete_event_size=limits.max_header_bytes,
        access_log=access_log,
    )


def serve(
    bundle: str,
    config: RuntimeConfig = RuntimeConfig(),
    backend_options: Any = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    grpc_port: int | None = None,
    model_name: str | None = None,
    log_level: str = "info",
    limits: ServerLimits = ServerLimits(),
    control: ControlPlane = ControlPlane(),
    verify_key: str | None = None,
    http: str = "auto",
    loop: str = "auto",
    workers: int = 1,
    log_format: str = "text",
    access_log: bool = False,
) -> None:
    """Load the bundle (its signature checked against ``verify_key`` when given) and serve it until
    interrupted (blocking): REST on ``port`` and, with ``grpc_port``, KServe v2 gRPC on that port, both in
    one event loop over one runtime. ``workers`` > 1: that many front-end processes serve REST (and gRPC)
    and feed this process's runtime (:mod:`.frontends`)."""
    import uvicorn

    if not 1 <= workers <= 64:
        raise InvalidInputError(f"workers must be in 1..64, got {workers}")
    metrics = ServerMetrics()
    runtime = Runtime.load(bundle, config, backend_options, observer=metrics.observe_batch, verify_key=verify_key)
    try:
        name = model_name or Path(bundle).resolve().name
        svc = ModelService(runtime, name, limits=limits, control=control, metrics=metrics)
        if workers > 1:
            from .frontends import FrontEndPool, run_pool

            restored = control.restore(runtime)
            if restored:
                log.info("control plane: restored bank %s (%s…)", restored["bank"], restored["vectors_sha256"][:12])
            log.info("serving %s as model %r (backend %s)", bundle, name, runtime.backend_name)
            pool = FrontEndPool(
                svc,
                workers=workers,
                host=host,
                port=port,
                grpc_port=grpc_port,
                limits=limits,
                control=control,
                metrics=metrics,
                http=http,
                loop=loop,
                log_level=log_level,
                log_format=log_format,
                access_log=access_log,
            )
            run_pool(pool)
            return
        app = create_app(runtime, name, metrics=metrics, limits=limits, control=control, service=svc)
        log.info("serving %s as model %r on http://%s:%d (backend %s)", bundle, name, host, port, runtime.backend_name)
        cfg = uvicorn_config(app, limits, host=host, port=port, log_level=log_level, http=http, access_log=access_log)
        factory = _loop_factory(loop)
        cfg.loop = "none"  # the loop is ours (below), for REST alone and REST beside gRPC alike
        server = uvicorn.Server(cfg)
        if grpc_port is None:
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(server.serve())
            return

        async def both() -> None:
            from .grpc_server import start_grpc_server

            grpc_server, _ = await start_grpc_server(svc, host=host, port=grpc_port, limits=limits)
            try:
                await server.serve()
            finally:
                await grpc_server.stop(2.0)

        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(both())
    finally:
        runtime.close()
