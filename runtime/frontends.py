"""Several front-end processes feeding one engine process (``forgetrt serve --workers N``).

One Python process tops out at a few thousand HTTP requests per second: parsing, routing and encoding
hold its GIL, while the engine behind it could run far more. With ``workers`` > 1 the server becomes:

* **one engine process** (the one you started): it loads the bundle, owns the :class:`Runtime`, its
  dynamic batcher and backends, the :class:`ModelService` (composition, deadlines, statistics, health,
  the control plane and its audit log) and the Prometheus registry. It serves no HTTP itself.
* **N front-end processes** (spawned, never forked, and never importing torch): each runs the same
  REST app (and the gRPC service with ``grpc_port``) over a :class:`RemoteService`. They accept from
  one shared REST listening socket, and gRPC's port is shared through ``SO_REUSEPORT``. A front end
  reads, bounds and parses requests, checks what needs no bank (shapes, outputs, parameters), and
  sends each inference to the engine over its own Unix socket pair: one small header, the request's
  forget parameter as JSON, and the raw tensor bytes. The engine resolves the composition against its
  bank snapshot and answers with the logits' raw bytes and the bank version, so selection, exact hot
  swap, errors and ``bank_version`` are those of the single-process server.

Frames sent in one turn of either event loop go out in one write, so a loaded engine answers a whole
batch's requests with a few system calls. What differs from one process, and why:

* :class:`~forgetrt.runtime.limits.ServerLimits` apply per front-end process, as in nginx or
  gunicorn: ``max_connections`` and ``max_inflight`` bound each one; the engine's batcher queue bounds
  the whole.
* Counters of failures that a front end answers itself (a malformed body, an unknown model) and of
  HTTP responses reach the engine's registry within half a second, and before that front end answers a
  ``/metrics`` or statistics request; successes are counted by the engine when they happen.
* A front end that dies is started again; if the engine process dies, the front ends close.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import multiprocessing
import os
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from . import control as _control_module
from . import service as _service_module
from .control import ControlDisabled, ControlPlane, Unauthorized
from .errors import EngineError, ForgetRTError, InvalidInputError
from .iospec import IOSpec
from .limits import ServerLimits
from .runtime import dtype_error
from .service import InferCall, InferOutcome, ModelService, ModelStats, WorkerLost

__all__ = ["FrontEndPool", "RemoteService", "EngineHub", "EngineUnavailable", "MAX_WORKERS"]

log = logging.getLogger("forgetrt.frontends")

MAX_WORKERS = 64
#: a frame: the length of what follows, its kind, the request id it answers or asks
_HEAD = struct.Struct("<IBQ")
_INFER = 1  # front end -> engine: one inference; engine -> front end: its answer
_RPC = 2  # front end -> engine: a JSON call (metadata, config, load_bank...); the engine answers in kind
_COUNTS = 3  # front end -> engine: counter deltas (no answer)
_CANCEL = 4  # front end -> engine: the client gave up on this inference (no answer)
#: an inference: flags, timeout (us, -1: none), forget JSON length, image shape (4), coeffs shape (2)
_REQ = struct.Struct("<BqIIIIIII")
_ALONE, _HAS_COEFFS = 1, 2
#: an answer: 0 ok / 1 error; ok: bank version, queue us, compute us, rows, classes, then the logits
_RES = struct.Struct("<BQddII")
_ERR = struct.Struct("<B")
MAX_FRAME = (1 << 32) - 1
FLUSH_COUNTS_S = 0.5
QUICK_EXIT_S, START_TRIES = 5.0, 3  # a front end that dies this soon this many times in a row stops the server


class EngineUnavailable(WorkerLost):
    """503 / UNAVAILABLE: the engine process this front end feeds is gone (it is restarting or stopped)."""


def _error_classes() -> dict[str, type[ForgetRTError]]:
    """Every ForgetRT error type by name, so a front end raises the very type the engine raised."""
    out: dict[str, type[ForgetRTError]] = {}
    todo: list[type] = [ForgetRTError]
    while todo:
        cls = todo.pop()
        out.setdefault(cls.__name__, cls)
        todo.extend(cls.__subclasses__())
    return out


def _error_dict(e: BaseException) -> dict[str, Any]:
    if isinstance(e, ForgetRTError):  # the type and its bases: the front end raises the nearest it knows
        mro = [c.__name__ for c in type(e).__mro__ if issubclass(c, ForgetRTError)]
        return {"type": mro, "message": str(e)}
    log.exception("engine: unexpected %s", type(e).__name__, exc_info=e)
    return {"type": ["EngineError"], "message": f"engine failure ({type(e).__name__})"}


def _error_from(d: dict[str, Any], classes: dict[str, type[ForgetRTError]]) -> ForgetRTError:
    cls = next((classes[n] for n in d.get("type", ()) if n in classes), EngineError)
    return cls(d.get("message", ""))


def _raise_payload(raw: bytes | memoryview, classes: dict[str, type[ForgetRTError]]) -> ForgetRTError:
    return _error_from(json.loads(bytes(raw)), classes)


class _Framed(asyncio.Protocol):
    """Length-prefixed frames over a stream; frames written in one loop turn leave in one write."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._loop = asyncio.get_event_loop()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos, end = 0, len(buf)
        view = memoryview(buf)
        try:
            while end - pos >= _HEAD.size:
                length, kind, rid = _HEAD.unpack_from(buf, pos)
                stop = pos + 4 + length
                if stop > end:
                    break
                try:
                    self.frame(kind, rid, view[pos + _HEAD.size : stop])
                except Exception as e:  # noqa: BLE001 - one bad frame must not close the connection
                    self.frame_failed(kind, rid, e)
                pos = stop
        finally:
            view.release()
        if pos:
            del buf[:pos]

    def frame(self, kind: int, rid: int, payload: memoryview) -> None:
        raise NotImplementedError

    def frame_failed(self, kind: int, rid: int, e: BaseException) -> None:
        log.error("a frame (kind %d) could not be handled: %r", kind, e)

    def send(self, kind: int, rid: int, *parts: bytes, now: bool = False) -> None:
        """Queue a frame for the end of this loop turn; ``now``: write it (and anything queued) at once,
        for a lone request that nothing else would join."""
        length = _HEAD.size - 4 + sum(len(p) for p in parts)
        if length > MAX_FRAME:
            raise InvalidInputError("a message between front end and engine is over 4 GiB")
        self._out.append(_HEAD.pack(length, kind, rid))
        self._out.extend(parts)
        if now:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _flush(self) -> None:
        if not self._out:
            return
        out, self._out = self._out, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)


# ---------------------------------------------------------------------------------------------- engine


class EngineHub:
    """The engine process's side: takes front ends' connections and runs their requests on ``svc``."""

    def __init__(self, svc: ModelService, metrics: Any = None) -> None:
        self.svc, self.metrics = svc, metrics
        self.connections: set[_EngineSide] = set()
        self.forget_cache: dict[bytes, Any] = {}

    async def attach(self, sock: socket.socket) -> _EngineSide:
        """Serve one front end's end of a socket pair on the running loop."""
        loop = asyncio.get_running_loop()
        _, side = await loop.connect_accepted_socket(lambda: _EngineSide(self), sock)
        return side

    # ------------------------------------------------------------------ calls
    async def rpc(self, op: str, args: dict[str, Any]) -> Any:
        svc = self.svc
        if op == "metadata":
            return await svc.metadata()
        if op == "config":
            return await svc.config()
        if op == "statistics":
            return await svc.statistics()
        if op == "readiness":
            return await svc.readiness()
        if op == "metrics":
            from prometheus_client import generate_latest

            return None if self.metrics is None else generate_latest(self.metrics.registry).decode()
        if op == "load_bank":
            return await svc.load_bank(args.get("authorization"), args.get("bank"), str(args.get("caller")))
        raise InvalidInputError(f"unknown engine call {op[:40]!r}")

    def counts(self, d: dict[str, Any]) -> None:
        for error, status, inference, n in d.get("failures", ()):
            self.svc.count_failure_named(str(error), int(status), inference=bool(inference), n=int(n))
        if self.metrics is not None:
            for route, status, n in d.get("responses", ()):
                self.metrics.responses.labels(route=str(route), status=str(status)).inc(int(n))


class _EngineSide(_Framed):
    def __init__(self, hub: EngineHub) -> None:
        super().__init__()
        self.hub = hub
        self._tasks: set[asyncio.Task] = set()
        self._incoming: list[tuple[int, InferCall, bool]] = []
        self._running: dict[int, asyncio.Future] = {}  # inferences under way, by request id (to cancel)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._incoming:
            self._dispatch()

    def frame_failed(self, kind: int, rid: int, e: BaseException) -> None:
        super().frame_failed(kind, rid, e)
        if kind == _INFER:  # the front end waits for an answer: it gets one
            self._reply_error(rid, e)
        elif kind == _RPC:
            self.send(kind, rid, json.dumps({"error": _error_dict(e)}).encode())

    def _reply_error(self, rid: int, e: BaseException, *, now: bool = False) -> None:
        """Answer inference ``rid`` with its typed error."""
        self.send(_INFER, rid, _ERR.pack(1), json.dumps(_error_dict(e)).encode(), now=now)

    def _reply(self, rid: int, o: InferOutcome, *, now: bool = False) -> None:
        """Answer inference ``rid`` with its logits and bank version."""
        n, c = o.logits.shape
        self.send(
            _INFER, rid, _RES.pack(0, o.bank_version, o.queue_us, o.compute_us, n, c), o.logits.tobytes(), now=now
        )

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.hub.connections.add(self)

    def connection_lost(self, exc) -> None:
        self.hub.connections.discard(self)
        self.transport = None

    def frame(self, kind: int, rid: int, payload: memoryview) -> None:
        if kind == _INFER:
            try:
                call, alone = self._decode(payload)
            except Exception as e:  # noqa: BLE001 - answered, never dropped
                self._reply_error(rid, e)
                return
            self._incoming.append((rid, call, alone))
            return
        if kind == _CANCEL:  # the batcher skips a cancelled job; a running one ends unanswered
            if (running := self._running.pop(rid, None)) is not None:
                running.cancel()
            else:  # its request came in this same read and waits for dispatch: drop it
                self._incoming = [t for t in self._incoming if t[0] != rid]
            return
        if kind == _RPC:
            task = self._loop.create_task(self._rpc(rid, bytes(payload)))
        elif kind == _COUNTS:
            try:
                self.hub.counts(json.loads(bytes(payload)))
            except Exception:  # noqa: BLE001 - counters must never take the engine down
                log.exception("engine: bad counter update from a front end")
            return
        else:
            log.error("engine: unknown frame kind %d from a front end", kind)
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _decode(self, p: memoryview) -> tuple[InferCall, bool]:
        flags, timeout_us, jlen, n, c, h, w, cn, ck = _REQ.unpack_from(p, 0)
        pos = _REQ.size
        forget = self._forget(bytes(p[pos : pos + jlen])) if jlen else None
        pos += jlen
        size = n * c * h * w * 4
        images = np.frombuffer(p[pos : pos + size], np.float32).reshape(n, c, h, w).copy()
        pos += size
        coeffs = None
        if flags & _HAS_COEFFS:
            coeffs = np.frombuffer(p[pos : pos + cn * ck * 4], np.float32).reshape(cn, ck).copy()
        params = _service_module.RequestParameters(forget=forget, timeout_us=timeout_us if timeout_us >= 0 else None)
        return InferCall(images, coeffs, params), bool(flags & _ALONE)

    def _forget(self, raw: bytes) -> Any:
        """A request's forget parameter; the last few distinct ones are kept decoded (clients repeat them)."""
        cache = self.hub.forget_cache
        if (value := cache.get(raw)) is None:
            value = json.loads(raw)
            if len(raw) <= 512:
                if len(cache) >= 256:
                    cache.clear()
                cache[raw] = value
        return value  # read only: the runtime never changes a composition it is given

    def _dispatch(self) -> None:
        """Run what one read brought: a lone request through ``ModelService.infer`` (it may run inline,
        on this loop); under load, each straight into the batcher, answered from its future's callback
        (no task or coroutine per request)."""
        todo, self._incoming = self._incoming, []
        svc = self.hub.svc
        if len(todo) == 1 and todo[0][2] and svc.inflight == 0:
            rid, call, alone = todo[0]
            try:  # alone in its front end and here: run it now if the engine is idle and the call short
                o = svc.infer_now(call)
            except Exception as e:  # noqa: BLE001 - every failure goes back typed
                self._reply_error(rid, e, now=True)
                return
            if o is not None:
                self._reply(rid, o, now=True)
                return
            task = self._loop.create_task(self._infer(rid, call, alone))
            self._tasks.add(task)
            self._running[rid] = task
            task.add_done_callback(functools.partial(self._ran, rid))
            return
        for rid, call, _ in todo:
            try:
                fut, finish = svc.submit(call)
            except Exception as e:  # noqa: BLE001 - every failure goes back typed
                self._reply_error(rid, e)
                continue
            self._running[rid] = fut
            fut.add_done_callback(functools.partial(self._answer, rid, finish))

    def _ran(self, rid: int, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._running.pop(rid, None)

    def _answer(self, rid: int, finish: Callable[[asyncio.Future], InferOutcome], fut: asyncio.Future) -> None:
        self._running.pop(rid, None)
        try:
            o = finish(fut)
        except asyncio.CancelledError:  # the front end cancelled it and expects no answer
            return
        except BaseException as e:  # noqa: BLE001 - a callback: answer, never raise into the loop
            self._reply_error(rid, e)
            return
        self._reply(rid, o)

    async def _infer(self, rid: int, call: InferCall, alone: bool) -> None:
        try:
            o = await self.hub.svc.infer(call, peer_alone=alone)
        except asyncio.CancelledError:  # the front end cancelled it and expects no answer
            raise
        except BaseException as e:  # noqa: BLE001 - every failure goes back typed
            self._reply_error(rid, e)
            if not isinstance(e, Exception):
                raise
            return
        self._reply(rid, o)

    async def _rpc(self, rid: int, raw: bytes) -> None:
        try:
            d = json.loads(raw)
            value = await self.hub.rpc(str(d.get("op")), d.get("args") or {})
            out = json.dumps({"ok": value}).encode()
        except Exception as e:  # noqa: BLE001
            out = json.dumps({"error": _error_dict(e)}).encode()
        self.send(_RPC, rid, out)


# ---------------------------------------------------------------------------------------------- front end


class _FrontSide(_Framed):
    def __init__(self, lost: Callable[[], None]) -> None:
        super().__init__()
        self.pending: dict[int, asyncio.Future] = {}
        self._next = 0
        self._lost_cb = lost
        self.closed = False

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.transport = None
        err = EngineUnavailable("the engine process is gone; retry shortly")
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(err)
        self.pending.clear()
        self._lost_cb()

    def request(self, kind: int, *parts: bytes, now: bool = False) -> tuple[int, asyncio.Future]:
        if self.closed:
            raise EngineUnavailable("the engine process is gone; retry shortly")
        self._next += 1
        fut = self._loop.create_future()
        self.pending[self._next] = fut
        self.send(kind, self._next, *parts, now=now)
        return self._next, fut

    def cancel(self, rid: int) -> None:
        """The caller gave up on ``rid``: tell the engine, so it does not run (or count) it."""
        if self.pending.pop(rid, None) is not None and not self.closed:
            self.send(_CANCEL, rid)

    def frame(self, kind: int, rid: int, payload: memoryview) -> None:
        fut = self.pending.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_result((kind, bytes(payload)))


class _CounterChild:
    __slots__ = ("key", "sink")

    def __init__(self, key: tuple[str, str], sink: dict[tuple[str, str], int]) -> None:
        self.key, self.sink = key, sink

    def inc(self, n: int = 1) -> None:
        self.sink[self.key] = self.sink.get(self.key, 0) + n


class _DeltaCounter:
    """Counts like a Prometheus counter with route and status labels, for the engine's registry."""

    def __init__(self) -> None:
        self.pending: dict[tuple[str, str], int] = {}

    def labels(self, *, route: str, status: str) -> _CounterChild:
        return _CounterChild((route, status), self.pending)


class FrontEndMetrics:
    """What the REST app counts in a front end: HTTP responses, sent on to the engine's registry."""

    registry = None

    def __init__(self) -> None:
        self.responses = _DeltaCounter()


class _TokenGate:
    """The control plane's credential check in a front end, which holds only the token's SHA-256."""

    def __init__(self, digest: bytes | None) -> None:
        self._digest = digest

    @property
    def enabled(self) -> bool:
        return self._digest is not None

    def authorize(self, authorization: str | None) -> None:
        if self._digest is None:
            raise ControlDisabled(_control_module.DISABLED_MESSAGE)
        scheme, _, given = (authorization or "").partition(" ")
        ok = hmac.compare_digest(hashlib.sha256(given.strip().encode()).digest(), self._digest)
        if scheme.lower() != "bearer" or not ok:
            raise Unauthorized(_control_module.UNAUTHORIZED_MESSAGE)


class RemoteService(ModelService):
    """A :class:`ModelService` whose engine runs in another process (see the module docstring)."""

    def __init__(
        self,
        spec: IOSpec,
        model_name: str,
        *,
        limits: ServerLimits = ServerLimits(),
        token_digest: bytes | None = None,
        metrics: FrontEndMetrics | None = None,
    ) -> None:
        self.spec, self.model_name, self.limits = spec, model_name, limits
        self.control = _TokenGate(token_digest)  # type: ignore[assignment]
        self.admission, self.instance = None, None
        self.metrics = metrics or FrontEndMetrics()
        self.stats = ModelStats()  # unused here: the engine keeps the model's statistics
        self.inflight = 0
        labels = list(spec.labels or [])
        self.labels = labels if len(labels) == spec.num_classes else None
        self.link: _FrontSide | None = None
        self._failures: dict[tuple[str, int, bool], int] = {}
        self._errors = _error_classes()
        self.on_lost: Callable[[], None] = lambda: None

    async def connect(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        _, self.link = await loop.connect_accepted_socket(lambda: _FrontSide(lambda: self.on_lost()), sock)

    def _link(self) -> _FrontSide:
        if self.link is None or self.link.closed:
            raise EngineUnavailable("the engine process is gone; retry shortly")
        return self.link

    # ------------------------------------------------------------------ calls to the engine
    async def _call(self, op: str, **args: Any) -> Any:
        self.flush_counts()  # a reader of statistics or metrics sees this front end's failures so far
        _, fut = self._link().request(_RPC, json.dumps({"op": op, "args": args}).encode())
        kind, raw = await fut
        d = json.loads(raw)
        if "error" in d:
            raise _error_from(d["error"], self._errors)
        return d["ok"]

    async def metadata(self) -> dict[str, Any]:
        return await self._call("metadata")

    async def config(self) -> dict[str, Any]:
        return await self._call("config")

    async def statistics(self) -> dict[str, Any]:
        return await self._call("statistics")

    async def exposition(self, metrics: Any) -> bytes:
        return (await self._call("metrics") or "").encode()

    async def readiness(self) -> str | None:
        try:
            return await self._call("readiness")
        except EngineUnavailable as e:
            return str(e)

    async def load_bank(self, authorization: str | None, raw: Any, caller: str) -> dict[str, Any]:
        self.control.authorize(authorization)
        return await self._call("load_bank", authorization=authorization, bank=raw, caller=caller)

    def count_failure_named(self, error: str, status: int, *, inference: bool = True, n: int = 1) -> None:
        key = (error, int(status), bool(inference))
        self._failures[key] = self._failures.get(key, 0) + n

    def flush_counts(self) -> None:
        responses = self.metrics.responses.pending if self.metrics is not None else {}
        if not (self._failures or responses) or self.link is None or self.link.closed:
            return
        d = {
            "failures": [[e, s, i, n] for (e, s, i), n in self._failures.items()],
            "responses": [[r, s, n] for (r, s), n in responses.items()],
        }
        self._failures.clear()
        responses.clear()
        self.link.send(_COUNTS, 0, json.dumps(d).encode())

    async def infer(self, call: InferCall, *, peer_alone: bool = True) -> InferOutcome:
        out = self.check_call(call)
        images = call.images
        if images.dtype != np.float32:  # the runtime's own words (the wire carries float32)
            raise dtype_error(images.dtype, self.spec.input_range)
        params = call.params
        forget = b"" if params.forget is None else json.dumps(params.forget).encode()
        coeffs = call.coeffs
        # alone: nothing else in this front end is being read, parsed or run (this request is not counted yet)
        flags = (_ALONE if self.inflight == 0 else 0) | (_HAS_COEFFS if coeffs is not None else 0)
        n, c, h, w = images.shape
        cn, ck = coeffs.shape if coeffs is not None else (0, 0)
        head = _REQ.pack(flags, -1 if params.timeout_us is None else params.timeout_us, len(forget), n, c, h, w, cn, ck)
        parts = [head, forget, np.ascontiguousarray(images).tobytes()]
        if coeffs is not None:
            parts.append(np.ascontiguousarray(coeffs).tobytes())
        link = self._link()
        self.inflight += 1
        try:
            rid, fut = link.request(_INFER, *parts, now=bool(flags & _ALONE))
            try:
                kind, raw = await fut
            except asyncio.CancelledError:  # the client went away (a gRPC deadline, a cancelled call)
                link.cancel(rid)
                raise
        finally:
            self.inflight -= 1
        if raw[0] != 0:
            raise _raise_payload(memoryview(raw)[_ERR.size :], self._errors)
        _, version, queue_us, compute_us, rows, classes = _RES.unpack_from(raw, 0)
        logits = np.frombuffer(raw, np.float32, rows * classes, _RES.size).reshape(rows, classes)
        cls = self.classify(logits, out.class_count) if out.class_count else None
        return InferOutcome(self.spec.output_name, logits, cls, version, queue_us, compute_us, out)


# ---------------------------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class FrontEndSpec:
    """What a front-end process needs (pickled to it when spawned)."""

    spec: IOSpec
    model_name: str
    limits: ServerLimits
    token_digest: bytes | None
    host: str
    grpc_port: int | None
    http: str
    loop: str
    log_level: str
    log_format: str
    access_log: bool = False
    index: int = 0


def _front_end_main(fe: FrontEndSpec, rest_sock: socket.socket, engine_sock: socket.socket) -> None:
    """A front-end process: the REST app (and gRPC) over a RemoteService, until the engine goes away."""
    from .logs import configure_logging

    configure_logging(fe.log_level, fe.log_format)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine process stops us (SIGTERM), not the terminal
    with contextlib.suppress(OSError):  # a group of our own: what we leave behind if killed can be reaped
        os.setpgid(0, 0)
    import uvicorn

    from .server import _loop_factory, create_app, uvicorn_config

    metrics = FrontEndMetrics()
    svc = RemoteService(fe.spec, fe.model_name, limits=fe.limits, token_digest=fe.token_digest, metrics=metrics)
    app = create_app(None, fe.model_name, metrics=metrics, limits=fe.limits, service=svc)  # type: ignore[arg-type]
    cfg = uvicorn_config(app, fe.limits, host=fe.host, log_level=fe.log_level, http=fe.http, access_log=fe.access_log)
    cfg.loop = "none"
    server = uvicorn.Server(cfg)

    async def main() -> None:
        await svc.connect(engine_sock)
        svc.on_lost = lambda: setattr(server, "should_exit", True)
        grpc_server = None
        if fe.grpc_port is not None:
            from .grpc_server import start_grpc_server

            grpc_server, _ = await start_grpc_server(
                svc, host=fe.host, port=fe.grpc_port, limits=fe.limits, reuse_port=True
            )

        async def flush() -> None:
            while True:
                await asyncio.sleep(FLUSH_COUNTS_S)
                svc.flush_counts()

        flusher = asyncio.get_running_loop().create_task(flush())
        try:
            await server.serve(sockets=[rest_sock])
        finally:
            flusher.cancel()
            svc.flush_counts()
            if grpc_server is not None:
                await grpc_server.stop(2.0)
            await asyncio.sleep(0)  # let the last counts leave

    with asyncio.Runner(loop_factory=_loop_factory(fe.loop)) as runner:
        runner.run(main())


def _reserve_port(host: str, port: int) -> socket.socket:
    """A bound, never-listening SO_REUSEPORT socket: it holds ``port`` (or picks one for 0) for the
    front ends' gRPC servers, which bind it with SO_REUSEPORT too. A port that anything listens on, with or
    without SO_REUSEPORT (another ``--workers`` server's front ends, say), is refused: a plain bind is tried
    first; connections in TIME_WAIT do not count, as for the one-process server. (Two ``--workers`` servers
    started within the same second could still both reserve a port before either listens.)"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:  # fails on a port held in any way
            # as the one-process gRPC server binds: a port with connections in TIME_WAIT is free to use
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
            port = probe.getsockname()[1]
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            s.bind((host, port))
        except OSError:
            s.close()
            raise
    except OSError as e:
        raise InvalidInputError(f"cannot listen for gRPC on {host}:{port}: {e.strerror}") from None
    return s


@dataclass
class _Worker:
    index: int
    process: Any
    engine_end: socket.socket
    started: float = field(default_factory=time.monotonic)
    side: _EngineSide | None = None  # the engine's end of its connection, once attached

    def exited(self) -> bool:
        """Whether the front end has exited, without reaping it: until it is joined its pid, and so its
        process group's id, cannot be taken by another process."""
        pid = self.process.pid
        if pid is None:
            return False
        if not self._uncollected():
            return True
        try:
            return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def _uncollected(self) -> bool:
        # multiprocessing's exitcode and is_alive() collect the child (waitpid): read its Popen instead
        popen = getattr(self.process, "_popen", None)
        return popen is not None and getattr(popen, "returncode", None) is None

    def reap(self) -> None:
        """Kill what an exited front end left behind (its parse pool's workers, in its process group),
        then collect it. Call only once :meth:`exited` is true and before anything joins the process."""
        if self.process.pid is not None and self._uncollected():  # a zombie still holds its group's id
            with contextlib.suppress(OSError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.join(5.0)

    def close(self) -> None:
        if self.side is not None and self.side.transport is not None:
            self.side.transport.close()  # the transport owns the socket once attached
        elif self.side is None:
            self.engine_end.close()


class FrontEndPool:
    """Start ``workers`` front-end processes that feed ``svc`` (whose runtime lives in this process).

    ``start()`` binds the REST socket (and reserves the gRPC port), spawns the front ends and attaches
    them to an :class:`EngineHub` on the running loop; a front end that exits unexpectedly is started
    again. ``stop()`` ends them. ``http_port``/``grpc_port`` are the bound ports (useful with port 0)."""

    def __init__(
        self,
        svc: ModelService,
        *,
        workers: int,
        host: str = "127.0.0.1",
        port: int = 8000,
        grpc_port: int | None = None,
        limits: ServerLimits = ServerLimits(),
        control: ControlPlane = ControlPlane(),
        metrics: Any = None,
        http: str = "auto",
        loop: str = "auto",
        log_level: str = "info",
        log_format: str = "text",
        access_log: bool = False,
    ) -> None:
        if not 1 <= int(workers) <= MAX_WORKERS:
            raise InvalidInputError(f"workers must be in 1..{MAX_WORKERS}, got {workers}")
        self.svc, self.workers = svc, int(workers)
        self.hub = EngineHub(svc, metrics)
        digest = hashlib.sha256(control.token.encode()).digest() if control.token is not None else None
        self._fe = FrontEndSpec(
            svc.spec, svc.model_name, limits, digest, host, grpc_port, http, loop, log_level, log_format, access_log
        )
        self._host, self._port = host, port
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: dict[int, _Worker] = {}
        self._rest: socket.socket | None = None
        self._grpc_hold: socket.socket | None = None
        self._stopping = False
        self._watch: asyncio.Task | None = None
        self.restarts = 0
        self.failed: str | None = None
        self._failed_event = asyncio.Event()
        self.http_port = 0
        self.grpc_port: int | None = None

    async def start(self) -> None:
        import uvicorn

        cfg = uvicorn.Config(None, host=self._host, port=self._port)  # type: ignore[arg-type]
        try:
            self._rest = cfg.bind_socket()
        except SystemExit:  # uvicorn logs the reason and exits
            raise InvalidInputError(f"cannot listen on {self._host}:{self._port}") from None
        self.http_port = self._rest.getsockname()[1]
        if self._fe.grpc_port is not None:
            self._grpc_hold = _reserve_port(self._host, self._fe.grpc_port)
            self.grpc_port = self._grpc_hold.getsockname()[1]
            self._fe = replace(self._fe, grpc_port=self.grpc_port)
        for i in range(self.workers):
            await self._spawn(i)
        self._watch = asyncio.get_running_loop().create_task(self._supervise())

    async def _spawn(self, index: int) -> None:
        engine_end, front_end = socket.socketpair()
        p = self._ctx.Process(
            target=_front_end_main,
            args=(replace(self._fe, index=index), self._rest, front_end),
            name=f"forgetrt-frontend-{index}",
            daemon=False,  # a front end has children of its own (its parse pool); it exits when the engine does
        )
        w = self._procs[index] = _Worker(index, p, engine_end)  # known before it starts: stop() sees it
        try:
            await asyncio.to_thread(p.start)
        finally:
            front_end.close()
        try:
            w.side = await self.hub.attach(engine_end)
        except BaseException:
            p.kill()  # a front end nobody can talk to must not keep serving its socket
            raise

    def _dead(self) -> list[_Worker]:
        return [w for w in self._procs.values() if w.exited()]

    async def _supervise(self) -> None:
        quick: dict[int, int] = {}  # front ends that died soon after starting, in a row
        while not self._stopping:
            await asyncio.sleep(0.25)
            for w in self._dead():
                if self._stopping:
                    return
                i = w.index
                w.reap()
                w.close()
                quick[i] = quick.get(i, 0) + 1 if time.monotonic() - w.started < QUICK_EXIT_S else 0
                while True:
                    if quick[i] >= START_TRIES:
                        self.failed = f"front end {i} failed {START_TRIES} times within {QUICK_EXIT_S:g} s of starting"
                        log.error("%s (last exit code %s): stopping", self.failed, w.process.exitcode)
                        self._failed_event.set()
                        return
                    log.error("front end %d exited (code %s); starting it again", i, w.process.exitcode)
                    await asyncio.sleep(0.5 * quick[i])
                    if self._stopping:
                        return
                    try:
                        self.restarts += 1
                        await self._spawn(i)
                        break
                    except Exception as e:  # noqa: BLE001 - e.g. out of file descriptors: try again, then stop
                        log.error("front end %d could not be started: %r", i, e)
                        quick[i] += 1

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._procs.values() if w.process.pid is not None]

    async def stop(self, grace_s: float = 5.0) -> None:
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        # our copy of the listening socket goes first: once the front ends close theirs (uvicorn does on
        # SIGTERM, before draining), new connections are refused instead of waiting in a backlog nobody reads
        for s in (self._rest, self._grpc_hold):
            if s is not None:
                s.close()
        for w in self._procs.values():
            if w.process.pid is not None and not w.exited():
                w.process.terminate()  # uvicorn's SIGTERM: stop accepting, finish what is in flight

        def wait(w: _Worker, until: float) -> bool:
            while not w.exited() and time.monotonic() < until:
                time.sleep(0.02)
            return w.exited()

        def join() -> None:
            deadline = time.monotonic() + grace_s
            for w in self._procs.values():
                if w.process.pid is None:
                    continue
                if not wait(w, deadline):
                    w.process.kill()
                    wait(w, time.monotonic() + 2.0)
                w.reap()

        await asyncio.to_thread(join)
        await asyncio.sleep(0.05)  # the last counter updates
        for w in self._procs.values():
            w.close()


def run_pool(pool: FrontEndPool, on_started: Callable[[FrontEndPool], None] | None = None) -> None:
    """Run ``pool`` on this thread's new event loop until SIGINT or SIGTERM (the CLI's engine process)."""
    from .server import _loop_factory

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await pool.start()
        log.info(
            "%d front-end processes (pids %s) on http://%s:%d%s feed this engine process (pid %d)",
            pool.workers,
            ",".join(map(str, pool.pids())),
            pool._host,
            pool.http_port,
            f" and gRPC :{pool.grpc_port}" if pool.grpc_port is not None else "",
            os.getpid(),
        )
        if on_started is not None:
            on_started(pool)
        waits = [loop.create_task(stop.wait()), loop.create_task(pool._failed_event.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in waits:
                t.cancel()
            await pool.stop()
        if pool.failed:
            raise EngineError(f"the server stopped: {pool.failed} (see the log above)")

    with asyncio.Runner(loop_factory=_loop_factory(pool._fe.loop)) as runner:
        runner.run(main())
