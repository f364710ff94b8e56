"""Where one batch-1 REST request's time goes in `forgetrt serve`, stage by stage, in one process:
the engine alone, the runtime through the batcher, the server's parsing and encoding, the whole ASGI app
without a network, the app over a loopback socket with one keep-alive client, and the hop a front-end
process adds (`serve --workers N`: a RemoteService here, the engine in a spawned process, a socket pair
between them).

    python benchmarks/request_breakdown.py --bundle forgetrt-demo/bundle --runs 2000

Each stage is timed back to back (``runs`` times after a warm-up) and reported as its median; the
difference between consecutive rows is what the added layer costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import threading
import time

import numpy as np

from forgetrt.runtime import BatchingConfig, Runtime, RuntimeConfig
from forgetrt.runtime.bench_remote import rest_binary_request
from forgetrt.runtime.limits import ServerLimits
from forgetrt.runtime.server import HEADER_LEN, _encode_json, _parse_infer, create_app, uvicorn_config


def _median_us(fn, runs: int) -> float:
    for _ in range(max(10, runs // 10)):
        fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def _engine_process(bundle: str, sock, ready) -> None:
    """The engine side of the front-end hop: a runtime and an EngineHub on ``sock`` until it closes."""
    import uvloop

    from forgetrt.runtime.frontends import EngineHub
    from forgetrt.runtime.service import ModelService

    config = RuntimeConfig(backend="onnxruntime", device="cpu", batching=BatchingConfig(max_batch_size=64))
    with Runtime.load(bundle, config, {"threads": 1}) as rt:

        async def run() -> None:
            hub = EngineHub(ModelService(rt, "m"))
            await hub.attach(sock)
            ready.set()
            while hub.connections:
                await asyncio.sleep(0.05)

        uvloop.run(run())


def _front_end_hop(bundle: str, x: np.ndarray, name: str, runs: int) -> float:
    import multiprocessing
    import socket

    import uvloop

    from forgetrt.runtime.bundle import Bundle
    from forgetrt.runtime.frontends import RemoteService
    from forgetrt.runtime.service import InferCall, RequestParameters

    ctx = multiprocessing.get_context("spawn")
    ours, theirs = socket.socketpair()
    ready = ctx.Event()
    proc = ctx.Process(target=_engine_process, args=(bundle, theirs, ready))
    proc.start()
    theirs.close()
    ready.wait(60)
    svc = RemoteService(Bundle.load(bundle).iospec, "m")
    call = InferCall(x, None, RequestParameters(forget=[name]))
    loop = uvloop.new_event_loop()
    loop.run_until_complete(svc.connect(ours))
    try:
        return _median_us(lambda: loop.run_until_complete(svc.infer(call)), runs)
    finally:
        ours.close()
        proc.join(10)
        loop.close()


def asgi_call(app, body: bytes, header_len: str):
    """A coroutine function that POSTs ``body`` to ``/v2/models/m/infer`` on the ASGI ``app`` (no network)
    and checks for a 200."""
    headers = [(HEADER_LEN.lower().encode(), header_len.encode()), (b"content-length", str(len(body)).encode())]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v2/models/m/infer",
        "raw_path": b"/v2/models/m/infer",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }

    async def once() -> None:
        sent = False

        async def receive():
            nonlocal sent
            if sent:
                await asyncio.sleep(3600)
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        status = {}

        async def send(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]

        await app(dict(scope), receive, send)
        assert status["code"] == 200, status

    return once


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--json")
    a = ap.parse_args()
    config = RuntimeConfig(backend="onnxruntime", device="cpu", batching=BatchingConfig(max_batch_size=64))
    rt = Runtime.load(a.bundle, config, {"threads": 1})
    spec = rt.iospec
    x = np.random.default_rng(0).uniform(0, 1, (1, *spec.shape)).astype(np.float32)
    name = rt.snapshot.names[0]
    req_headers, body = rest_binary_request(spec.image_name, spec.output_name, x, name)
    hl = next(v for k, v in req_headers.items() if k.lower() == HEADER_LEN)
    rows: dict[str, float] = {}
    coeffs = rt.snapshot.coeff_row([name])[None]
    rows["engine call (backend.run)"] = _median_us(lambda: rt.backends[0].run(x, coeffs, rt.snapshot), a.runs)
    rows["Runtime.infer (direct)"] = _median_us(lambda: rt.infer(x, [name]), a.runs)
    loop = asyncio.new_event_loop()
    batched_cfg = RuntimeConfig(
        backend="onnxruntime", device="cpu", batching=BatchingConfig(max_batch_size=64, inline_max_us=0)
    )
    with Runtime.load(a.bundle, batched_cfg, {"threads": 1}) as rt_batched:
        rows["Runtime.infer_async (batcher, --inline-max-us 0)"] = _median_us(
            lambda: loop.run_until_complete(rt_batched.infer_async(x, [name])), a.runs
        )
    inline_cfg = RuntimeConfig(
        backend="onnxruntime", device="cpu", batching=BatchingConfig(max_batch_size=64, inline_max_us=1000)
    )
    with Runtime.load(a.bundle, inline_cfg, {"threads": 1}) as rt_inline:
        rows["Runtime.infer_async (inline dispatch, --inline-max-us 1000)"] = _median_us(
            lambda: loop.run_until_complete(rt_inline.infer_async(x, [name])), a.runs
        )
    limits = ServerLimits()
    rows["parse request (JSON header + tensor)"] = _median_us(lambda: _parse_infer(body, hl, spec, limits), a.runs)
    logits = rt.infer(x, [name]).logits
    resp = {"model_name": "m", "outputs": [{"name": spec.output_name, "datatype": "FP32", "shape": [1, 10]}]}
    rows["encode answer (JSON)"] = _median_us(
        lambda: _encode_json(dict(resp, outputs=[dict(resp["outputs"][0])]), logits), a.runs
    )

    app = create_app(rt, "m")
    asgi_once = asgi_call(app, body, hl)
    rows["whole ASGI app, no network"] = _median_us(lambda: loop.run_until_complete(asgi_once()), a.runs)

    import http.client

    import uvicorn

    server = uvicorn.Server(uvicorn_config(app, limits, port=0, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    conn = http.client.HTTPConnection("127.0.0.1", port)
    headers = {HEADER_LEN: hl, "Content-Type": "application/octet-stream"}

    def over_http() -> None:
        conn.request("POST", "/v2/models/m/infer", body, headers)
        r = conn.getresponse()
        r.read()
        assert r.status == 200

    rows["uvicorn + loopback socket, 1 client (same process)"] = _median_us(over_http, a.runs)
    server.should_exit = True
    th.join(10)
    rt.close()
    rows["front-end hop: RemoteService.infer, engine in another process (--workers N)"] = _front_end_hop(
        a.bundle, x, name, a.runs
    )
    out = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "median_us": rows}
    for k, v in rows.items():
        print(f"{v:9.1f} us  {k}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
