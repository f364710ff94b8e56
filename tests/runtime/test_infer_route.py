"""The inference routes, served on ASGI ahead of Starlette (server._InferRoutes): the same paths, methods,
errors and counters as the other routes, driven message by message."""

import asyncio
import json

import numpy as np
import pytest

from forgetrt.runtime import BatchingConfig, Runtime, RuntimeConfig
from forgetrt.runtime.bench_remote import rest_binary_request
from forgetrt.runtime.server import HEADER_LEN, ServerMetrics, create_app


@pytest.fixture(scope="module")
def app(digits_bundle):
    metrics = ServerMetrics()
    cfg = RuntimeConfig(backend="onnxruntime", device="cpu", batching=BatchingConfig(max_batch_size=8))
    with Runtime.load(digits_bundle, cfg, observer=metrics.observe_batch) as rt:
        yield create_app(rt, "digits", metrics=metrics, instance="replica-7"), metrics, rt


def _call(app, method, path, messages, headers=(), root_path=""):
    """One ASGI request: ``messages`` are what receive() returns in turn (then it waits forever)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": root_path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    queue = list(messages)
    sent: list[dict] = []

    async def receive():
        if queue:
            return queue.pop(0)
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    async def run():
        await asyncio.wait_for(app(scope, receive, send), 30)

    asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


def _request(rt):
    x = np.random.default_rng(0).uniform(0, 1, (1, *rt.iospec.shape)).astype(np.float32)
    headers, body = rest_binary_request(rt.iospec.image_name, rt.iospec.output_name, x, rt.snapshot.names[0])
    return x, list(headers.items()), body


def _counted(metrics, route, status) -> float:
    labels = {"route": route, "status": str(status)}
    return metrics.registry.get_sample_value("forgetrt_http_responses_total", labels) or 0.0


@pytest.mark.parametrize("path", ["/v2/models/digits/infer", "/v2/models/digits/versions/1/infer"])
def test_a_body_in_several_messages_is_answered_and_counted_under_its_route(app, path):
    app, metrics, rt = app
    x, headers, body = _request(rt)
    route = "/v2/models/{model}/infer" if "versions" not in path else "/v2/models/{model}/versions/{version}/infer"
    before = _counted(metrics, route, 200)
    parts = [body[:7], body[7:100], body[100:]]
    msgs = [{"type": "http.request", "body": p, "more_body": i < 2} for i, p in enumerate(parts)]
    status, head, out = _call(app, "POST", path, msgs, [*headers, ("content-length", str(len(body)))])
    assert status == 200 and head["x-forgetrt-instance"] == "replica-7", out[:300]
    assert head["content-type"] == "application/octet-stream" and int(head["content-length"]) == len(out)
    n = int(head[HEADER_LEN])
    meta = json.loads(out[:n])
    logits = np.frombuffer(out[n:], np.float32).reshape(meta["outputs"][0]["shape"])
    np.testing.assert_allclose(logits, rt.infer(x, [rt.snapshot.names[0]]).logits, atol=1e-5)
    assert _counted(metrics, route, 200) == before + 1


def test_json_answers_carry_their_length_and_type(app):
    app, _, rt = app
    x = np.zeros((1, *rt.iospec.shape), np.float32)
    req = {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    body = json.dumps(req).encode()
    status, head, out = _call(app, "POST", "/v2/models/digits/infer", [{"type": "http.request", "body": body}])
    assert status == 200 and head["content-type"] == "application/json" and int(head["content-length"]) == len(out)
    assert json.loads(out)["outputs"][0]["shape"] == [1, 10]


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_other_methods_get_a_json_405_naming_post(app, method):
    app, metrics, _ = app
    before = _counted(metrics, "/v2/models/{model}/infer", 405)
    status, head, out = _call(app, method, "/v2/models/digits/infer", [{"type": "http.request", "body": b""}])
    assert status == 405 and head["allow"] == "POST" and json.loads(out) == {"error": "Method Not Allowed"}
    assert _counted(metrics, "/v2/models/{model}/infer", 405) == before + 1


@pytest.mark.parametrize(
    "path, status",
    [
        ("/v2/models/other/infer", 404),  # an unknown model: the handler's 404
        ("/v2/models/digits/versions/2/infer", 404),
        ("/v2/models//infer", 404),  # an empty name is no match: Starlette's 404
        ("/v2/models/digits/versions//infer", 404),
        ("/v2/models/digits/infer/", 404),
        ("/v2/models/digits/infer/x", 404),
        ("/v2/models/digits/other/1/infer", 404),
        ("/v3/models/digits/infer", 404),
        ("v2/models/digits/infer", 404),
    ],
)
def test_near_misses_are_json_404s(app, path, status):
    app, _, _ = app
    got, head, out = _call(app, "POST", path, [{"type": "http.request", "body": b"{}"}])
    assert got == status and head["content-type"] == "application/json" and "error" in json.loads(out)


def test_a_disconnect_before_the_whole_body_is_a_counted_400(app):
    app, metrics, rt = app
    _, headers, body = _request(rt)
    before = _counted(metrics, "/v2/models/{model}/infer", 400)
    msgs = [{"type": "http.request", "body": body[:10], "more_body": True}, {"type": "http.disconnect"}]
    status, _, out = _call(app, "POST", "/v2/models/digits/infer", msgs, headers)
    assert status == 400 and "disconnected" in json.loads(out)["error"]
    assert _counted(metrics, "/v2/models/{model}/infer", 400) == before + 1


def test_the_first_of_repeated_headers_counts(app):
    app, _, rt = app
    x, headers, body = _request(rt)
    hl = next(v for k, v in headers if k.lower() == HEADER_LEN)
    dup = [(HEADER_LEN, hl), (HEADER_LEN, "3"), ("content-encoding", "identity"), ("content-encoding", "zstd")]
    status, _, _ = _call(app, "POST", "/v2/models/digits/infer", [{"type": "http.request", "body": body}], dup)
    assert status == 200
    bad = [(HEADER_LEN, "3"), (HEADER_LEN, hl)]
    status, _, out = _call(app, "POST", "/v2/models/digits/infer", [{"type": "http.request", "body": body}], bad)
    assert status == 400 and "error" in json.loads(out)


def test_an_oversized_declared_body_is_refused_before_reading(app):
    app, _, _ = app
    msgs = []  # nothing is ever received: the answer comes from the header alone
    status, head, out = _call(app, "POST", "/v2/models/digits/infer", msgs, [("content-length", str(1 << 40))])
    assert status == 413 and head.get("connection") == "close" and "limit" in json.loads(out)["error"]


def test_under_a_root_path_the_routes_match_what_follows_it(app):
    """Mounted under a prefix (uvicorn --root-path, a proxy that strips one, a Starlette Mount), as every
    other route: the scope's path still starts with the root path."""
    app, metrics, rt = app
    _, headers, body = _request(rt)
    msgs = [{"type": "http.request", "body": body}]
    for path in ("/api/v2/models/digits/infer", "/api/v2/models/digits/versions/1/infer"):
        status, _, out = _call(app, "POST", path, list(msgs), headers, root_path="/api")
        assert status == 200, out[:200]
    status, head, _ = _call(app, "GET", "/api/v2/models/digits/infer", list(msgs), headers, root_path="/api")
    assert status == 405 and head["allow"] == "POST"
    status, _, _ = _call(app, "GET", "/api/v2/models/digits", [], root_path="/api")  # Starlette's own routes
    assert status == 200
    status, _, _ = _call(app, "POST", "/apix/v2/models/digits/infer", list(msgs), headers, root_path="/api")
    assert status == 404  # not under the prefix


def test_a_final_newline_in_the_path_is_a_404(app):
    app, _, rt = app
    _, headers, body = _request(rt)
    status, _, _ = _call(app, "POST", "/v2/models/digits/infer\n", [{"type": "http.request", "body": body}], headers)
    assert status == 404
