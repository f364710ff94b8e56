"""The KServe v2 server on a real uvicorn socket (loopback only), driven by the standard tritonclient.http
client and by raw malformed HTTP requests."""

import asyncio
import json
import threading
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from forgetrt.runtime import BatchingConfig, Runtime, RuntimeConfig
from forgetrt.runtime.server import ServerMetrics, create_app

ATOL = 1e-5
# engines differ from the torch reference by float32 rounding: a few ulps, which at logits near 16 exceed
# ATOL alone (seen on an AVX2-only AMD EPYC); RTOL allows about 8 ulps of the value
RTOL = 1e-6


@pytest.fixture(scope="module")
def server(digits_bundle):
    import uvicorn

    metrics = ServerMetrics()
    rt = Runtime.load(
        digits_bundle,
        RuntimeConfig(
            backend="onnxruntime", device="cpu", batching=BatchingConfig(max_batch_size=16, max_queue_delay_us=500)
        ),
        observer=metrics.observe_batch,
    )
    app = create_app(rt, "digits", metrics=metrics)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.time() + 10
    while not srv.started and time.time() < deadline:
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"127.0.0.1:{port}", rt
    srv.should_exit = True
    th.join(10)
    rt.close()


def _input(x, binary=True, name="image"):
    i = httpclient.InferInput(name, list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=binary)
    return i


def test_health_and_metadata(server):
    url, rt = server
    c = httpclient.InferenceServerClient(url)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("digits")
    assert not c.is_model_ready("other")
    meta = c.get_model_metadata("digits")
    assert meta["inputs"][0] == {"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}
    assert meta["inputs"][1]["shape"] == [-1, 9] and meta["outputs"][0]["shape"] == [-1, 10]
    assert c.get_server_metadata()["name"] == "forgetrt"


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_infer_forms(server, torch_reference, binary):
    url, _ = server
    c = httpclient.InferenceServerClient(url)
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    outs = [httpclient.InferRequestedOutput("logits", binary_data=binary)]
    eye = np.eye(9, dtype=np.float32)
    cases = [
        ({"forget": {"forget-3": 1.0, "forget-1": -0.5}}, eye[3] - 0.5 * eye[1]),
        ({"forget": ["forget-0", "forget-3"]}, eye[0] + eye[3]),
        ({"forget": "forget-2,forget-4"}, eye[2] + eye[4]),
        ({"forget": '{"forget-5": 2.0}'}, 2 * eye[5]),
        ({"policy": "eu"}, eye[3]),
        (None, np.zeros(9, np.float32)),
    ]
    for params, row in cases:
        r = c.infer("digits", [_input(x, binary)], parameters=params, outputs=outs)
        np.testing.assert_allclose(r.as_numpy("logits"), torch_reference(x, np.tile(row, (3, 1))), atol=ATOL, rtol=RTOL)
        assert r.get_response()["parameters"]["bank_version"] == 0
    coeffs = np.random.default_rng(1).uniform(-1, 1, (3, 9)).astype(np.float32)  # a different row per image
    r = c.infer("digits", [_input(x, binary), _input(coeffs, binary, "coeffs")], outputs=outs)
    np.testing.assert_allclose(r.as_numpy("logits"), torch_reference(x, coeffs), atol=ATOL, rtol=RTOL)


def _post(url, body, headers=None, path="/v2/models/digits/infer"):
    return httpx.post(f"http://{url}{path}", content=body, headers=headers or {}, timeout=10)


def _malformed_requests():
    good = {"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}
    reqs = []
    # bad JSON and wrong envelopes
    for body in [
        b"",
        b"{",
        b"[]",
        b"null",
        b'"x"',
        b'{"inputs": 5}',
        b'{"inputs": []}',
        b"\xff\xfe",
        b'{"inputs": [5]}',
    ]:
        reqs.append((body, {}))
    # wrong shapes / counts
    for shape in [
        [1, 1, 8],
        [1, 3, 8, 8],
        [2, 1, 4, 8],
        [1, 1, 8, 9],
        [],
        [-1, 1, 8, 8],
        ["a"],
        [1.5, 1, 8, 8],
        [0, 1, 8, 8],
        [17, 1, 8, 8],
    ]:
        n = int(np.prod([d for d in shape if isinstance(d, int) and d > 0])) if shape else 1
        reqs.append((json.dumps({"inputs": [{**good, "shape": shape, "data": [0.5] * n}]}).encode(), {}))
    # wrong datatypes and values
    for dt in ["FP64", "INT64", "UINT8", "BYTES", "fp32", None, 7]:
        reqs.append((json.dumps({"inputs": [{**good, "datatype": dt}]}).encode(), {}))
    for data in [["x"] * 64, [0.5] * 63, [[0.5] * 65], None, "abc"]:
        reqs.append((json.dumps({"inputs": [{**good, "data": data}]}).encode(), {}))
    for v in [float("nan"), float("inf"), float("-inf"), 1.5, -0.1, 1e30]:  # json.dumps writes NaN/Infinity tokens
        reqs.append((json.dumps({"inputs": [{**good, "data": [v] * 64}]}).encode(), {}))
    # unknown names, bad parameters, both composition forms
    for params in [
        {"forget": ["nope"]},
        {"forget": {"forget-3": 5.0}},
        {"forget": {"forget-3": "x"}},
        {"policy": "mars"},
        {"policy": 3},
        {"forget": 7},
        {"forget": [1, 2]},
        {"forget": "{bad json"},
        {"forget": ["forget-9"]},
        {"policy": "eu", "forget": ["forget-1"]},
        "str",
    ]:
        reqs.append((json.dumps({"inputs": [good], "parameters": params}).encode(), {}))
    reqs.append(
        (
            json.dumps(
                {"inputs": [good, {"name": "coeffs", "shape": [1, 3], "datatype": "FP32", "data": [0, 0, 0]}]}
            ).encode(),
            {},
        )
    )
    reqs.append(
        (
            json.dumps(
                {"inputs": [good, {"name": "coeffs", "shape": [1, 9], "datatype": "FP32", "data": [9.0] * 9}]}
            ).encode(),
            {},
        )
    )
    reqs.append(
        (
            json.dumps(
                {"inputs": [good, {"name": "coeffs", "shape": [2, 9], "datatype": "FP32", "data": [0.0] * 18}]}
            ).encode(),
            {},
        )
    )
    reqs.append(
        (
            json.dumps({"inputs": [good, {"name": "extra", "shape": [1], "datatype": "FP32", "data": [0.0]}]}).encode(),
            {},
        )
    )
    reqs.append((json.dumps({"inputs": [good, good]}).encode(), {}))
    reqs.append(
        (
            json.dumps(
                {"inputs": [{"name": "coeffs", "shape": [1, 9], "datatype": "FP32", "data": [0.0] * 9}]}
            ).encode(),
            {},
        )
    )
    # binary extension: truncated payloads, wrong sizes, bad header lengths
    raw = np.full((1, 1, 8, 8), 0.5, np.float32).tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1, 1, 8, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    for cut in range(1, len(raw), 16):  # 16 truncations
        reqs.append((head + raw[:-cut], {"Inference-Header-Content-Length": str(len(head))}))
    for hl in ["abc", "0", str(len(head) + 10_000), "-5", str(len(head) - 3)]:
        reqs.append((head + raw, {"Inference-Header-Content-Length": hl}))
    reqs.append((head + raw + b"\x00" * 8, {"Inference-Header-Content-Length": str(len(head))}))
    wrong = json.dumps(
        {
            "inputs": [
                {"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "parameters": {"binary_data_size": 12}}
            ]
        }
    ).encode()
    reqs.append((wrong + raw[:12], {"Inference-Header-Content-Length": str(len(wrong))}))
    nan = np.full((1, 1, 8, 8), np.nan, np.float32).tobytes()
    reqs.append((head + nan, {"Inference-Header-Content-Length": str(len(head))}))
    return reqs


def test_malformed_requests_get_4xx_and_server_keeps_serving(server, torch_reference):
    url, _ = server
    reqs = _malformed_requests()
    # repeat the set with unknown model names and versions, up to well over 200 requests
    statuses = []
    for body, headers in reqs * 3:
        statuses.append((_post(url, body, headers).status_code, body[:80]))
    for path in ["/v2/models/nope/infer", "/v2/models/digits/versions/7/infer", "/v2/models/nope"]:
        for _ in range(10):
            r = (
                httpx.post(f"http://{url}{path}", content=b"{}", timeout=10)
                if path.endswith("infer")
                else httpx.get(f"http://{url}{path}", timeout=10)
            )
            statuses.append((r.status_code, path.encode()))
    assert len(statuses) >= 200
    bad = [(s, b) for s, b in statuses if not 400 <= s < 500]
    assert not bad, bad[:5]
    r = _post(url, b'{"inputs": [5]}')
    assert "error" in r.json()
    # still answers valid requests correctly
    c = httpclient.InferenceServerClient(url)
    x = np.random.default_rng(5).random((2, 1, 8, 8), dtype=np.float32)
    res = c.infer("digits", [_input(x)], parameters={"policy": "pair"})
    eye = np.eye(9, dtype=np.float32)
    np.testing.assert_allclose(
        res.as_numpy("logits"), torch_reference(x, np.tile(eye[0] + eye[3], (2, 1))), atol=ATOL, rtol=RTOL
    )
    with pytest.raises(InferenceServerException, match="unknown vector"):
        c.infer("digits", [_input(x)], parameters={"forget": ["zzz"]})


def test_concurrent_clients_are_batched_and_metrics_exported(server, torch_reference):
    url, _ = server
    x = np.random.default_rng(7).random((1, 1, 8, 8), dtype=np.float32)
    errors = []

    def client(i):
        c = httpclient.InferenceServerClient(url)
        try:
            for _ in range(10):
                r = c.infer("digits", [_input(x)], parameters={"forget": {f"forget-{i % 9}": 1.0}})
                want = torch_reference(x, np.eye(9, dtype=np.float32)[i % 9][None])
                np.testing.assert_allclose(r.as_numpy("logits"), want, atol=ATOL, rtol=RTOL)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    text = httpx.get(f"http://{url}/metrics").text
    for name in (
        "forgetrt_requests_total",
        "forgetrt_request_failures_total",
        "forgetrt_queue_seconds_bucket",
        "forgetrt_compute_seconds_bucket",
        "forgetrt_batch_images_bucket",
    ):
        assert name in text
    assert 'forgetrt_requests_total{status="200"}' in text


def test_bank_hot_swap_through_repository_endpoint(digits_bundle, digits_bank, torch_reference, tmp_path):
    """The control plane end to end: a token, a bank root, the swap served, audited, and restored after a restart."""
    import shutil

    import uvicorn

    from forgetrt.runtime.control import ControlPlane

    root = tmp_path / "banks"
    shutil.copytree(digits_bank[0], root / "v2")
    token = "t0ken-for-the-test-0123456789"
    control = ControlPlane(token, root, tmp_path / "state")
    rt = Runtime.load(digits_bundle, RuntimeConfig(backend="onnxruntime", device="cpu"))
    srv = uvicorn.Server(
        uvicorn.Config(create_app(rt, "digits", control=control), host="127.0.0.1", port=0, log_level="warning")
    )
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.02)
    url = f"127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"
    load = f"http://{url}/v2/repository/models/digits/load"
    auth = {"Authorization": f"Bearer {token}"}
    try:
        assert httpx.post(load, json={"parameters": {"bank": "v2"}}).status_code == 401  # no credential
        r = httpx.post(load, json={"parameters": {"bank": "missing"}}, headers=auth)
        assert r.status_code == 404 and "not found under the bank root" in r.json()["error"]
        r = httpx.post(load, json={"parameters": {"bank": "v2"}}, headers=auth)
        assert r.status_code == 200 and r.json()["bank_version"] == 1, r.text
        assert "forget-9" not in r.json()["vectors"]  # mandatory stays baked, not selectable
        c = httpclient.InferenceServerClient(url)
        x = np.random.default_rng(2).random((1, 1, 8, 8), dtype=np.float32)
        res = c.infer("digits", [_input(x)], parameters={"forget": ["forget-4"]})
        assert res.get_response()["parameters"]["bank_version"] == 1
        np.testing.assert_allclose(
            res.as_numpy("logits"), torch_reference(x, np.eye(9, dtype=np.float32)[4][None]), atol=ATOL, rtol=RTOL
        )
        assert httpx.post(f"http://{url}/v2/repository/index").json()[0]["state"] == "READY"
    finally:
        srv.should_exit = True
        th.join(10)
        rt.close()
    audit = [json.loads(line) for line in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    assert [a["outcome"] for a in audit] == ["refused", "ok"] and audit[1]["bank"] == "v2" and audit[1]["version"] == 1
    # a restart restores the served bank before the first request
    rt2 = Runtime.load(digits_bundle, RuntimeConfig(backend="onnxruntime", device="cpu"))
    try:
        create_app(rt2, "digits", control=ControlPlane(token, root, tmp_path / "state"))
        assert rt2.snapshot.version == 1 and rt2.snapshot.label.endswith("v2")
    finally:
        rt2.close()


def test_http_stack_choices():
    from forgetrt.runtime.errors import InvalidInputError
    from forgetrt.runtime.limits import ServerLimits
    from forgetrt.runtime.server import _guarded_protocol, _loop_factory

    assert _guarded_protocol(ServerLimits(), None, "h11").__name__ == "GuardedH11Protocol"
    assert _guarded_protocol(ServerLimits(), None, "httptools").__name__ == "GuardedHttpToolsProtocol"
    assert _guarded_protocol(ServerLimits(), None, "auto").__name__ == "GuardedHttpToolsProtocol"  # installed here
    import uvloop

    assert _loop_factory("auto") is uvloop.new_event_loop and _loop_factory("uvloop") is uvloop.new_event_loop
    assert _loop_factory("asyncio") is asyncio.new_event_loop
    with pytest.raises(InvalidInputError, match="unknown event loop"):
        _loop_factory("trio")
    with pytest.raises(InvalidInputError, match="unknown HTTP implementation"):
        _guarded_protocol(ServerLimits(), None, "h2")


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_pipelined_requests_are_not_cut_off_by_the_header_timer(http):
    """A pipelined request whose headers arrived with its predecessor's runs longer than the header time
    limit: the timer must not be armed for it when the first response completes."""
    import socket

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from forgetrt.runtime.limits import ServerLimits
    from forgetrt.runtime.server import uvicorn_config

    async def fast(request):
        return PlainTextResponse("fast")

    async def slow(request):
        await asyncio.sleep(0.6)
        return PlainTextResponse("slow")

    app = Starlette(routes=[Route("/fast", fast), Route("/slow", slow)])
    limits = ServerLimits(header_timeout_s=0.3)
    srv = uvicorn.Server(uvicorn_config(app, limits, port=0, log_level="critical", http=http))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.01)
    port = srv.servers[0].sockets[0].getsockname()[1]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /fast HTTP/1.1\r\nhost: x\r\n\r\nGET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
            got = b""
            while got.count(b"HTTP/1.1 200") < 2:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
        assert got.count(b"HTTP/1.1 200") == 2 and got.endswith(b"slow"), got
    finally:
        srv.should_exit = True
        th.join(10)
