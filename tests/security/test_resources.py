"""Bounded resources: body size before reading, streamed bodies, header and body time limits, the
connection cap, the in-flight cap, malformed HTTP, and a JSON 500 for what nobody expected."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest

INFER = "/v2/models/digits/infer"


@pytest.fixture(params=["auto", "h11"])
def server(request):
    """The HTTP-layer guards on both protocols: the default (httptools where installed) and h11."""
    import forgetrt.runtime.server as srv

    if request.param == "auto":
        assert srv._httptools_available()  # the default really is the C parser here
        return request.getfixturevalue("live")
    return request.getfixturevalue("live_h11")


def _head(path: str, length: int | None = None, extra: str = "") -> bytes:
    cl = f"content-length: {length}\r\n" if length is not None else ""
    return f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{cl}{extra}\r\n".encode()


def _status(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1]) if resp.startswith(b"HTTP/1.1 ") else 0


def _json_body(resp: bytes) -> dict:
    return json.loads(resp.partition(b"\r\n\r\n")[2])


@pytest.mark.parametrize("declared", [(1 << 20) + 1, 10 << 30, 10**18])
def test_content_length_over_the_limit_is_refused_before_reading(server, declared):
    t0 = time.perf_counter()
    resp = server.raw(_head(INFER, declared))  # no body is sent at all
    assert _status(resp) == 413 and "over the limit" in _json_body(resp)["error"]
    assert time.perf_counter() - t0 < 2


def test_a_refused_body_closes_the_connection(server):
    """After the 413 the server closes the connection rather than reading and discarding the body."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(_head(INFER, 10 << 30))
        resp = b""
        while b"\r\n\r\n" not in resp:
            resp += s.recv(4096)
        assert _status(resp) == 413 and b"connection: close" in resp.lower()
        sent, t0 = 0, time.perf_counter()
        try:
            while time.perf_counter() - t0 < 3:
                sent += s.send(b"x" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert time.perf_counter() - t0 < 3 and sent < 64 << 20  # the peer went away


def test_streamed_body_stops_at_the_limit(server):
    chunk = b"x" * 65536
    data = _head(INFER, None, "transfer-encoding: chunked\r\n")
    data += b"".join(b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(20)) + b"0\r\n\r\n"  # 1.25 MiB
    resp = server.raw(data)
    assert _status(resp) == 413


@pytest.mark.parametrize("partial", [b"", b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\n", b"GE"])
def test_slow_or_idle_headers_are_cut_off(server, partial):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(partial)
        time.sleep(1.6)  # the header limit is 1 s
        s.settimeout(2)
        try:
            got = s.recv(100)
        except ConnectionResetError:
            got = b""
        assert got == b""  # closed by the server without a response


def test_slow_body_gets_408(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(_head(INFER, 100) + b'{"inputs": ')
        time.sleep(1.5)  # the body limit is 1 s
        s.settimeout(3)
        resp = s.recv(65536)
    assert _status(resp) == 408 and "did not arrive" in _json_body(resp)["error"]


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"POST /v2 HTTP/9.9\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: x\r\nbad header line\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * (70 << 10) + b"\r\n\r\n",
        b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\ncontent-length: -5\r\n\r\n",
        b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello",
    ],
)
def test_malformed_http_gets_a_json_4xx(server, raw):
    before = _counted(server, "(malformed HTTP)", "400")
    resp = server.raw(raw)
    assert 400 <= _status(resp) < 500 and "error" in _json_body(resp), resp[:200]
    if _status(resp) == 400:  # answered by the HTTP layer, before any route: counted all the same
        assert _counted(server, "(malformed HTTP)", "400") >= before + 1


def _counted(live, route: str, status: str) -> float:
    text = httpx.get(f"{live.url}/metrics", timeout=5).text
    key = f'forgetrt_http_responses_total{{route="{route}",status="{status}"}} '
    return next((float(line[len(key) :]) for line in text.splitlines() if line.startswith(key)), 0.0)


def test_connection_cap(server):
    socks = []
    try:
        for _ in range(45):  # the cap is 40 (this test's own connections included)
            socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        time.sleep(0.3)
        refused = 0
        for s in socks[-5:]:
            s.settimeout(2)
            try:
                data = s.recv(4096)
            except (TimeoutError, ConnectionResetError):
                data = b""
            if data.startswith(b"HTTP/1.1 503"):
                refused += 1
                assert b"too many open connections" in data
        assert refused >= 1
    finally:
        for s in socks:
            s.close()
    time.sleep(0.3)
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200  # serving again
    assert _counted(server, "(connection cap)", "503") >= refused  # refused before any route, still counted


def test_in_flight_cap_answers_429_before_reading(digits_bundle):
    from forgetrt.runtime import Runtime, RuntimeConfig
    from forgetrt.runtime.limits import ServerLimits
    from forgetrt.runtime.server import create_app

    from .conftest import Live

    limits = ServerLimits(max_inflight=2, body_timeout_s=5.0, header_timeout_s=5.0)
    rt = Runtime.load(digits_bundle, RuntimeConfig(backend="onnxruntime", device="cpu"))
    srv = Live(create_app(rt, "digits", limits=limits), limits)
    holders = []
    try:
        for _ in range(2):  # two requests whose bodies trickle in hold both slots
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            s.sendall(_head(INFER, 1000) + b'{"inputs": ')
            holders.append(s)
        time.sleep(0.3)
        r = httpx.post(f"{srv.url}{INFER}", content=b"{}", timeout=5)
        assert r.status_code == 429 and "in flight" in r.json()["error"]
    finally:
        for s in holders:
            s.close()
        srv.close()
        rt.close()


def test_a_big_body_does_not_hold_up_small_ones(live):
    """A body near the limit is answered while small requests keep being served."""
    # 800 images parse and are then refused as over the batch limit
    big = json.dumps(
        {"inputs": [{"name": "image", "shape": [800, 1, 8, 8], "datatype": "FP32", "data": [0.1234567] * 51200}]}
    ).encode()
    assert 500_000 < len(big) < (1 << 20)
    done = []

    def send_big():
        done.append(httpx.post(f"{live.url}{INFER}", content=big, timeout=20).status_code)

    threads = [threading.Thread(target=send_big) for _ in range(4)]
    for t in threads:
        t.start()
    r = httpx.get(f"{live.url}/v2/health/ready", timeout=10)
    for t in threads:
        t.join()
    assert r.status_code == 200 and done == [400] * 4


@pytest.fixture(scope="module")
def roomy(digits_bundle):
    """A server that takes 8 MiB bodies and batches of 20k images, with one parsing worker process."""
    from forgetrt.runtime import BatchingConfig, Runtime, RuntimeConfig
    from forgetrt.runtime.limits import ServerLimits
    from forgetrt.runtime.server import create_app

    from .conftest import Live

    limits = ServerLimits(max_body_bytes=8 << 20, parse_workers=1)
    rt = Runtime.load(
        digits_bundle,
        RuntimeConfig(backend="onnxruntime", device="cpu", batching=BatchingConfig(max_batch_size=20000)),
    )
    app = create_app(rt, "digits", limits=limits)
    srv = Live(app, limits)
    yield srv, app.app.state.offload, rt
    srv.close()
    rt.close()


def test_large_json_is_parsed_and_encoded_in_a_worker_process(roomy):
    """JSON of 1 MiB or more is parsed (and large answers encoded) in a worker process, not on the event
    loop's process where it would hold the GIL; the answer is the same as the runtime's own."""
    srv, offload, rt = roomy
    rng = np.random.default_rng(0)
    x = rng.random((2000, 1, 8, 8), dtype=np.float32)
    body = json.dumps(
        {
            "inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
            "parameters": {"forget": ["forget-3"]},
        }
    ).encode()
    assert len(body) > 1 << 20
    before = offload.jobs
    r = httpx.post(f"{srv.url}{INFER}", content=body, timeout=60)
    assert r.status_code == 200, r.text
    assert offload.jobs == before + 1  # parsed there (2000 x 10 logits are under the encoding threshold)
    got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(2000, 10)
    np.testing.assert_allclose(got, rt.infer(x, ["forget-3"]).logits, rtol=1e-5, atol=1e-5)

    small = x[:1]
    before = offload.jobs
    body = json.dumps(
        {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": small.ravel().tolist()}]}
    )
    assert httpx.post(f"{srv.url}{INFER}", content=body, timeout=10).status_code == 200
    assert offload.jobs == before  # small bodies stay inline

    # 10,000 images in binary form: parsed inline (little JSON), but 100k logits are encoded in the worker
    x = rng.random((10000, 1, 8, 8), dtype=np.float32)
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ]
        }
    ).encode()
    before = offload.jobs
    r = httpx.post(
        f"{srv.url}{INFER}",
        content=head + x.tobytes(),
        headers={"inference-header-content-length": str(len(head))},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert offload.jobs == before + 1
    got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(10000, 10)
    np.testing.assert_allclose(got, rt.infer(x).logits, rtol=1e-5, atol=1e-5)


def test_large_json_errors_come_back_typed_from_the_worker(roomy):
    srv, offload, _ = roomy
    bad = json.dumps(
        {"inputs": [{"name": "image", "shape": [20000, 1, 8, 8], "datatype": "FP32", "data": ["x"] * 1280000}]}
    ).encode()
    assert (1 << 20) < len(bad) < (8 << 20)
    r = httpx.post(f"{srv.url}{INFER}", content=bad, timeout=60)
    assert r.status_code == 400 and "data is not FP32" in r.json()["error"]


def test_a_dead_parsing_worker_is_a_503_and_replaced():
    import asyncio
    import os

    from forgetrt.runtime.server import WorkerLost, _Offloader

    off = _Offloader(1)
    try:
        with pytest.raises(WorkerLost, match="retry"):
            asyncio.run(off.run(os._exit, 1))  # the worker dies mid-job
        assert asyncio.run(off.run(abs, -3)) == 3  # a fresh worker takes the next one
    finally:
        off.close()


def test_an_unexpected_failure_is_a_json_500(digits_bundle):
    from forgetrt.runtime import Runtime, RuntimeConfig
    from forgetrt.runtime.limits import ServerLimits
    from forgetrt.runtime.server import ServerMetrics, create_app

    from .conftest import Live

    rt = Runtime.load(digits_bundle, RuntimeConfig(backend="onnxruntime", device="cpu"))

    async def broken(*a, **k):
        raise ZeroDivisionError("a bug")

    rt.infer_async = broken  # a bug nobody anticipated, not a client's mistake
    metrics = ServerMetrics()
    srv = Live(create_app(rt, "digits", metrics=metrics, instance="r1"), ServerLimits())
    try:
        body = json.dumps(
            {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}
        )
        r = httpx.post(f"{srv.url}{INFER}", content=body, timeout=5)
        assert r.status_code == 500 and r.json() == {"error": "internal server error"}
        assert r.headers.get_list("x-forgetrt-instance") == ["r1"]  # a failure names its server too
        assert 'status="500"' in httpx.get(f"{srv.url}/metrics", timeout=5).text
        x = np.zeros((1, 1, 8, 8), np.float32)
        assert rt.infer(x).logits.shape == (1, 10)  # the runtime itself is fine
    finally:
        srv.close()
        rt.close()


def test_a_header_line_that_never_ends_is_cut_off_at_the_size_limit(server):
    """httptools reports a header only once its line ends: the raw bytes of an unfinished head count too."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\nx-flood: ")
        got, sent = b"", 0
        try:
            while sent < (4 << 20) and not got:
                s.sendall(b"a" * 16384)  # never a CRLF
                sent += 16384
                s.settimeout(0.01)
                try:
                    got = s.recv(4096)
                except TimeoutError:
                    pass
                s.settimeout(5)
            if not got:
                got = s.recv(4096)
        except (BrokenPipeError, ConnectionResetError):
            pass
    assert sent < (1 << 20), sent  # refused near the 64 KiB limit, not after megabytes
    if got:
        assert _status(got) == 400 and b"too large" in got.lower() or b"error" in got
