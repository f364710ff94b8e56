"""KServe v2 over REST and gRPC from one process and one runtime, driven by the standard clients
(tritonclient.http, tritonclient.grpc): model configuration, statistics, the classification extension,
protocol-valid forget strings, per-output binary flags, gzip bodies, timeouts, and errors as HTTP
statuses and gRPC codes."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import time

import httpx
import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc", reason="needs the 'grpc' extra")
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from forgetrt.runtime import BatchingConfig, Runtime, RuntimeConfig  # noqa: E402
from forgetrt.runtime.server import ServerMetrics, create_app, uvicorn_config  # noqa: E402
from forgetrt.runtime.service import ModelService  # noqa: E402

ATOL = 1e-5


@pytest.fixture(scope="module", params=["one-process", "front-ends"])
def both(digits_bundle, request):
    """REST and gRPC on ephemeral ports over one runtime: in one event loop (as `forgetrt serve
    --grpc-port`), or from two front-end processes feeding this process's runtime (`--workers 2`). Every
    test here runs against both, so the front ends keep the one-process server's semantics."""
    import uvicorn

    from forgetrt.runtime.grpc_server import start_grpc_server

    metrics = ServerMetrics()
    rt = Runtime.load(
        digits_bundle,
        RuntimeConfig(backend="onnxruntime", device="cpu", batching=BatchingConfig(max_batch_size=16)),
        observer=metrics.observe_batch,
    )
    svc = ModelService(rt, "digits", metrics=metrics)
    if request.param == "front-ends":
        from forgetrt.runtime.frontends import FrontEndPool

        pool = FrontEndPool(svc, workers=2, port=0, grpc_port=0, metrics=metrics, log_level="warning")
        loop = asyncio.new_event_loop()
        th = threading.Thread(target=loop.run_forever, daemon=True)
        th.start()
        asyncio.run_coroutine_threadsafe(pool.start(), loop).result(60)
        _wait_ready(f"127.0.0.1:{pool.http_port}", pool.workers)
        yield {"http": f"127.0.0.1:{pool.http_port}", "grpc": f"127.0.0.1:{pool.grpc_port}", "rt": rt, "pool": pool}
        asyncio.run_coroutine_threadsafe(pool.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        th.join(10)
        rt.close()
        return
    app = create_app(rt, "digits", metrics=metrics, service=svc)
    cfg = uvicorn_config(app, port=0, log_level="warning")
    server = uvicorn.Server(cfg)
    ports: dict = {}

    async def main() -> None:
        g, ports["grpc"] = await start_grpc_server(svc, port=0)
        try:
            await server.serve()
        finally:
            await g.stop(1.0)

    th = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    th.start()
    deadline = time.time() + 15
    while not (server.started and "grpc" in ports) and time.time() < deadline:
        time.sleep(0.02)
    ports["http"] = server.servers[0].sockets[0].getsockname()[1]
    yield {"http": f"127.0.0.1:{ports['http']}", "grpc": f"127.0.0.1:{ports['grpc']}", "rt": rt}
    server.should_exit = True
    th.join(10)
    rt.close()


def _wait_ready(addr: str, workers: int, timeout: float = 60.0) -> None:
    """Until every front end answers (each new connection may reach any of them)."""
    deadline, seen = time.time() + timeout, 0
    while time.time() < deadline:
        try:
            if httpx.get(f"http://{addr}/v2/health/ready", timeout=2).status_code == 200:
                seen += 1
                if seen >= 4 * workers:
                    return
        except httpx.TransportError:
            time.sleep(0.05)
    raise TimeoutError(f"front ends at {addr} not ready in {timeout} s")


def _x(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, 1, 8, 8)).astype(np.float32)


def _grpc_infer(c, x, params=None, outputs=None, **kw):
    inp = grpcclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return c.infer("digits", [inp], parameters=params, outputs=outputs, **kw)


def _http_infer(c, x, params=None, outputs=None, binary=True, **kw):
    inp = httpclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return c.infer("digits", [inp], parameters=params, outputs=outputs, **kw)


def test_grpc_health_metadata_config_and_statistics(both):
    c = grpcclient.InferenceServerClient(both["grpc"])
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("digits")
    md = c.get_model_metadata("digits", as_json=True)
    assert md["inputs"][0] == {"name": "image", "datatype": "FP32", "shape": ["-1", "1", "8", "8"]}
    cfg = c.get_model_config("digits", as_json=True)["config"]
    assert cfg["max_batch_size"] == 16 and cfg["input"][0]["dims"] == ["1", "8", "8"]
    assert cfg["input"][1]["optional"] is True and cfg["parameters"]["vectors"]["string_value"].startswith("forget-0")
    assert "classification" in c.get_server_metadata(as_json=True)["extensions"]
    before = c.get_inference_statistics("digits", as_json=True)["model_stats"][0]
    _grpc_infer(c, _x(3))
    after = c.get_inference_statistics("digits", as_json=True)["model_stats"][0]
    assert int(after["inference_count"]) == int(before.get("inference_count", 0)) + 3
    assert int(after["inference_stats"]["success"]["count"]) >= 1 and int(after["execution_count"]) >= 1
    with pytest.raises(InferenceServerException, match="unknown model"):
        c.get_model_metadata("other")


def test_grpc_and_rest_answer_the_same_logits_for_the_same_compositions(both):
    g = grpcclient.InferenceServerClient(both["grpc"])
    h = httpclient.InferenceServerClient(both["http"])
    rt, x = both["rt"], _x(2, 1)
    cases = [
        ({"forget": "forget-3=1,forget-0=0.5"}, {"forget-3": 1.0, "forget-0": 0.5}),
        ({"forget": "forget-3,forget-7"}, ["forget-3", "forget-7"]),
        ({"policy": "eu"}, "eu"),
        ({"forget": '{"forget-1": -0.5}'}, {"forget-1": -0.5}),
        (None, None),
    ]
    for params, composition in cases:
        want = rt.infer(x, composition).logits
        gr = _grpc_infer(g, x, params)
        np.testing.assert_allclose(gr.as_numpy("logits"), want, atol=ATOL, err_msg=str(params))
        hr = _http_infer(h, x, params)
        np.testing.assert_allclose(hr.as_numpy("logits"), want, atol=ATOL, err_msg=str(params))
        assert gr.get_response(as_json=True)["parameters"]["bank_version"]["int64_param"] == "0"
        assert hr.get_response()["parameters"]["bank_version"] == 0


def test_the_classification_extension(both):
    rt, x = both["rt"], _x(2, 2)
    logits = rt.infer(x, ["forget-3"]).logits
    top = np.argsort(-logits, axis=1, kind="stable")[:, :3]
    g = grpcclient.InferenceServerClient(both["grpc"])
    res = _grpc_infer(g, x, {"forget": "forget-3"}, [grpcclient.InferRequestedOutput("logits", class_count=3)])
    got = res.as_numpy("logits")
    assert got.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            value, index, label = got[i, j].decode().split(":")
            assert int(index) == top[i, j] and abs(float(value) - logits[i, top[i, j]]) < 1e-5
            assert label == str(top[i, j])  # the digits bundle's labels are '0'..'9'
    h = httpclient.InferenceServerClient(both["http"])
    for binary in (True, False):
        out = httpclient.InferRequestedOutput("logits", binary_data=binary, class_count=3)
        r = _http_infer(h, x, {"forget": "forget-3"}, [out])
        text = [v.decode() if isinstance(v, bytes) else v for v in r.as_numpy("logits").ravel()]
        assert text == [v.decode() for v in got.ravel()]


def test_rest_output_flags_config_stats_and_gzip(both):
    url = f"http://{both['http']}"
    h = httpclient.InferenceServerClient(both["http"])
    x = _x(1, 3)
    r = _http_infer(h, x, outputs=[httpclient.InferRequestedOutput("logits", binary_data=False)])
    assert r.get_output("logits")["data"] and r.as_numpy("logits").shape == (1, 10)  # JSON data, per output
    cfg = h.get_model_config("digits")
    assert cfg["name"] == "digits" and cfg["output"][0]["dims"] == [10]
    assert h.get_inference_statistics("digits")["model_stats"][0]["name"] == "digits"
    assert httpx.get(f"{url}/v2/models/stats").json()["model_stats"][0]["name"] == "digits"
    r = _http_infer(h, x, {"forget": "forget-3"}, request_compression_algorithm="gzip")
    np.testing.assert_allclose(r.as_numpy("logits"), both["rt"].infer(x, ["forget-3"]).logits, atol=ATOL)
    body = json.dumps(
        {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": x.ravel().tolist()}]}
    ).encode()
    r = httpx.post(f"{url}/v2/models/digits/infer", content=gzip.compress(body), headers={"content-encoding": "gzip"})
    assert r.status_code == 200, r.text
    bomb = gzip.compress(b" " * (70 << 20))  # 70 MiB of spaces inflate past the 64 MiB body limit
    r = httpx.post(f"{url}/v2/models/digits/infer", content=bomb, headers={"content-encoding": "gzip"})
    assert r.status_code == 413 and "inflates" in r.json()["error"]
    r = httpx.post(f"{url}/v2/models/digits/infer", content=b"not gzip", headers={"content-encoding": "gzip"})
    assert r.status_code == 400 and "gzip" in r.json()["error"]
    r = httpx.post(f"{url}/v2/models/digits/infer", content=body, headers={"content-encoding": "br"})
    assert r.status_code == 400 and "Content-Encoding" in r.json()["error"]
    for path, method in [("/nope", "GET"), ("/v2/models/digits/infer", "GET"), ("/v2/models/digits/config", "POST")]:
        r = httpx.request(method, f"{url}{path}")
        assert r.status_code in (404, 405) and "error" in r.json()


def test_errors_are_grpc_status_codes(both):
    import grpc

    g = grpcclient.InferenceServerClient(both["grpc"])

    def code(fn) -> str:
        with pytest.raises(InferenceServerException) as e:
            fn()
        return str(e.value.status())

    assert code(lambda: _grpc_infer(g, _x(1), {"forget": "nope"})) == str(grpc.StatusCode.INVALID_ARGUMENT)
    assert code(lambda: _grpc_infer(g, _x(1) + 2)) == str(grpc.StatusCode.INVALID_ARGUMENT)  # pixels over 1
    assert code(lambda: _grpc_infer(g, _x(1), priority=2)) == str(grpc.StatusCode.INVALID_ARGUMENT)
    assert code(lambda: _grpc_infer(g, _x(1), {"forget": "forget-3=9"})) == str(grpc.StatusCode.INVALID_ARGUMENT)
    wrong = grpcclient.InferRequestedOutput("probs")
    assert code(lambda: _grpc_infer(g, _x(1), outputs=[wrong])) == str(grpc.StatusCode.INVALID_ARGUMENT)
    assert code(lambda: g.infer("other", [])) == str(grpc.StatusCode.NOT_FOUND)
    assert code(lambda: g.load_model("digits")) == str(grpc.StatusCode.PERMISSION_DENIED)  # control plane off
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg

    stub = pbg.GRPCInferenceServiceStub(grpc.insecure_channel(both["grpc"]))
    image = pb.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=[1, 1, 8, 8])
    with pytest.raises(grpc.RpcError) as e:  # 12 raw bytes for 64 floats
        stub.ModelInfer(pb.ModelInferRequest(model_name="digits", inputs=[image], raw_input_contents=[b"\x00" * 12]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "do not hold" in e.value.details()
    # typed contents (what KServe's client sends) instead of raw bytes
    x = _x(1, 4)
    typed = pb.ModelInferRequest.InferInputTensor(
        name="image", datatype="FP32", shape=[1, 1, 8, 8], contents=pb.InferTensorContents(fp32_contents=x.ravel())
    )
    res = stub.ModelInfer(pb.ModelInferRequest(model_name="digits", inputs=[typed]))
    got = np.frombuffer(res.raw_output_contents[0], np.float32).reshape(1, 10)
    np.testing.assert_allclose(got, both["rt"].infer(x).logits, atol=ATOL)
    short = pb.ModelInferRequest.InferInputTensor(
        name="image", datatype="FP32", shape=[1, 1, 8, 8], contents=pb.InferTensorContents(fp32_contents=[0.5] * 3)
    )
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(pb.ModelInferRequest(model_name="digits", inputs=[short]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # a request timeout (µs) is the request's deadline in the batcher: 1 µs has passed before it runs
    assert code(lambda: _grpc_infer(g, _x(1), timeout=1)) == str(grpc.StatusCode.DEADLINE_EXCEEDED)
    h = httpclient.InferenceServerClient(both["http"])
    with pytest.raises(InferenceServerException, match="deadline"):
        _http_infer(h, _x(1), timeout=1)


_KSERVE_CLIENT = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

http, grpc_addr = sys.argv[1], sys.argv[2]
x = np.random.default_rng(7).uniform(0, 1, (2, 1, 8, 8)).astype(np.float32)


def request(binary):
    inp = InferInput(name="image", shape=list(x.shape), datatype="FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return InferRequest(model_name="digits", infer_inputs=[inp], parameters={"forget": "forget-3=1,forget-0=0.5"})


async def main():
    rest = InferenceRESTClient(RESTConfig(protocol="v2"))
    grpc = InferenceGRPCClient(grpc_addr)
    r = await rest.infer(f"http://{http}", request(False), model_name="digits")
    g = await grpc.infer(request(True))
    out = {
        "rest": r.outputs[0].as_numpy().tolist(),
        "grpc": g.outputs[0].as_numpy().tolist(),
        "rest_ready": await rest.is_server_ready(f"http://{http}"),
        "grpc_ready": await grpc.is_server_ready(),
        "bank_version": r.parameters.get("bank_version"),
    }
    try:
        await grpc.infer(InferRequest(model_name="nope", infer_inputs=request(True).inputs))
    except Exception as e:  # the SDK raises grpc's error
        out["unknown_model"] = str(getattr(e, "code", lambda: e)())
    print(json.dumps(out))


asyncio.run(main())
"""


def test_kserve_python_sdk_over_rest_and_grpc(both, tmp_path):
    """KServe's SDK and tritonclient.grpc register the same protobuf names ('inference.*'), so one process
    cannot import both: the SDK runs in its own."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("kserve") is None:
        pytest.skip("KServe's SDK is not installed (the dev extra has it)")
    script = tmp_path / "kserve_client.py"
    script.write_text(_KSERVE_CLIENT)
    r = subprocess.run(
        [sys.executable, str(script), both["http"], both["grpc"]], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    x = np.random.default_rng(7).uniform(0, 1, (2, 1, 8, 8)).astype(np.float32)
    want = both["rt"].infer(x, {"forget-3": 1.0, "forget-0": 0.5}).logits
    np.testing.assert_allclose(np.asarray(out["rest"]), want, atol=ATOL)
    np.testing.assert_allclose(np.asarray(out["grpc"]), want, atol=ATOL)
    assert out["rest_ready"] and out["grpc_ready"] and out["bank_version"] == 0
    assert "NOT_FOUND" in out["unknown_model"]


def test_bench_url_measures_a_running_server_over_rest_and_grpc(both, tmp_path):
    from click.testing import CliRunner

    from forgetrt.runtime.bench import BenchConfig
    from forgetrt.runtime.bench_remote import RemoteTarget, run_remote_bench, summarize_remote
    from forgetrt.tools.cli import cli

    cfg = BenchConfig(batches=(1, 4), concurrency=(2,), active_vectors=(0, 2), duration=0.5, warmup=0.2)
    for protocol, url in (("rest", f"http://{both['http']}"), ("grpc", both["grpc"])):
        recs = run_remote_bench(RemoteTarget(url, "digits", protocol, client_processes=2), cfg)
        assert [(r["point"]["batch"], r["point"]["active_vectors"]) for r in recs] == [(1, 0), (1, 2), (4, 0), (4, 2)]
        for r in recs:
            assert r["errors"] == 0 and r["requests"] > 0 and r["point"]["path"] == protocol
            assert r["latency"]["p50_ms"] <= r["latency"]["p99_ms"] <= r["latency"]["max_ms"]
            assert r["throughput"]["images_per_s"] == pytest.approx(
                r["throughput"]["requests_per_s"] * r["point"]["batch"]
            )
            assert r["config"]["model"]["shape"] == [1, 8, 8] and len(r["config"]["model"]["vectors"]) == 9
        assert protocol in summarize_remote(recs)
    out = tmp_path / "remote.jsonl"
    r = CliRunner().invoke(
        cli,
        ["bench", "--url", both["grpc"], "--protocol", "grpc", "--model", "digits", "--batch", "1"]
        + ["--concurrency", "1", "--duration", "0.3", "--warmup", "0", "--client-processes", "1", "--json", str(out)],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text().splitlines()[0])["point"]["path"] == "grpc"
    r = CliRunner().invoke(cli, ["bench", "--url", f"http://{both['http']}"])
    assert r.exit_code == 2 and "--model" in r.output
    r = CliRunner().invoke(cli, ["bench", "--url", f"http://{both['http']}", "--model", "nope", "--duration", "0.2"])
    assert r.exit_code == 3 and "404" in r.output
    r = CliRunner().invoke(cli, ["bench", "some-bundle", "--url", f"http://{both['http']}", "--model", "digits"])
    assert r.exit_code == 2 and "not both" in r.output
    r = CliRunner().invoke(cli, ["bench", "--url", f"http://{both['http']}", "--model", "digits", "--batch", "64"])
    assert r.exit_code == 2 and "max_batch_size" in r.output


def test_hostile_requests_found_by_review_get_client_errors(both):
    """Each of these was once a 500 / UNKNOWN or a wrong answer (adversarial review of this front end)."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg

    url = f"http://{both['http']}"
    x = _x(1, 5)

    def rest(params=None, shape=None, data=None, **kw):
        inp = {"name": "image", "datatype": "FP32", "shape": shape or [1, 1, 8, 8]}
        inp["data"] = x.ravel().tolist() if data is None else data
        body = {"inputs": [inp], **({"parameters": params} if params else {})}
        return httpx.post(f"{url}/v2/models/digits/infer", content=json.dumps(body).encode(), **kw)

    # an empty tensor whose other dimensions overflow numpy
    r = rest(shape=[0, 2**31 - 1, 2**31 - 1], data=[])
    assert 400 <= r.status_code < 500 and "shape" in r.json()["error"]
    # a timeout no float division can take
    r = httpx.post(
        f"{url}/v2/models/digits/infer",
        content=b'{"inputs":[{"name":"image","datatype":"FP32","shape":[1,1,8,8],"data":'
        + json.dumps(x.ravel().tolist()).encode()
        + b'}],"parameters":{"timeout":1'
        + b"0" * 400
        + b"}}",
    )
    assert r.status_code == 400 and "timeout" in r.json()["error"]
    # a long name is echoed truncated (gRPC carries messages in a header of at most 8-16 KiB)
    r = rest({"forget": "X" * 20000})
    assert r.status_code == 400 and len(r.json()["error"]) < 1000
    # gzip: truncated, trailing bytes, and several members (valid: all of them are read)
    body = json.dumps(
        {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": x.ravel().tolist()}]}
    ).encode()
    gz = {"content-encoding": "gzip"}
    for bad, why in ((gzip.compress(body)[:-8], "truncated"), (gzip.compress(body) + b"GARBAGE", "gzip")):
        r = httpx.post(f"{url}/v2/models/digits/infer", content=bad, headers=gz)
        assert r.status_code == 400 and why in r.json()["error"], r.text
    n = len(body) // 2
    r = httpx.post(
        f"{url}/v2/models/digits/infer", content=gzip.compress(body[:n]) + gzip.compress(body[n:]), headers=gz
    )
    assert r.status_code == 200, r.text

    stub = pbg.GRPCInferenceServiceStub(grpc.insecure_channel(both["grpc"]))

    def grpc_code(req) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(req)
        assert len(e.value.details()) < 3000
        return e.value.code()

    def request(shape=(1, 1, 8, 8), raw=None, **params):
        req = pb.ModelInferRequest(model_name="digits")
        req.inputs.add(name="image", datatype="FP32", shape=list(shape))
        req.raw_input_contents.append(x.tobytes() if raw is None else raw)
        for k, v in params.items():
            req.parameters[k].string_param = v
        return req

    assert grpc_code(request(shape=(2**31 - 1, 2**31 - 1, 0), raw=b"")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert grpc_code(request(forget="X" * 20000)) == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_code(request(binary_data_output="maybe")) == grpc.StatusCode.INVALID_ARGUMENT
    both_kinds = request()
    both_kinds.inputs[0].contents.fp32_contents.extend(x.ravel().tolist())
    assert grpc_code(both_kinds) == grpc.StatusCode.INVALID_ARGUMENT  # raw and typed contents at once
    assert stub.ModelInfer(request(forget="forget-3")).raw_output_contents  # still answering


def test_logits_that_overflow_are_a_client_error_on_both_protocols(both, monkeypatch):
    from forgetrt.runtime.batcher import InferResult

    rt = both["rt"]

    async def overflow(*_, **__):
        return InferResult(np.full((1, 10), np.nan, np.float32), 0, 0.0, 0.0)

    monkeypatch.setattr(rt, "infer_async", overflow)
    # front ends: a lone request may run at once on the engine (infer_now)
    monkeypatch.setattr(
        rt, "infer_now", lambda *_, **__: InferResult(np.full((1, 10), np.nan, np.float32), 0, 0.0, 0.0)
    )
    h = httpclient.InferenceServerClient(both["http"])
    with pytest.raises(InferenceServerException, match="overflow"):
        _http_infer(h, _x(1))
    g = grpcclient.InferenceServerClient(both["grpc"])
    with pytest.raises(InferenceServerException, match="overflow") as e:
        _grpc_infer(g, _x(1))
    assert "INVALID_ARGUMENT" in str(e.value.status())


def test_grpc_malformed_messages_and_unimplemented_calls(both):
    import grpc
    from tritonclient.grpc import service_pb2 as pb

    channel = grpc.insecure_channel(both["grpc"])
    infer = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    for junk in (b"\xff\xff\xff", b"\x0a\x02\xff\xfe"):  # not a message; a string field that is not UTF-8
        with pytest.raises(grpc.RpcError) as e:
            infer(junk)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed ModelInfer" in e.value.details()
    shm = channel.unary_unary(
        "/inference.GRPCInferenceService/SystemSharedMemoryStatus",
        request_serializer=pb.SystemSharedMemoryStatusRequest.SerializeToString,
        response_deserializer=pb.SystemSharedMemoryStatusResponse.FromString,
    )
    with pytest.raises(grpc.RpcError) as e:
        shm(pb.SystemSharedMemoryStatusRequest())
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    g = grpcclient.InferenceServerClient(both["grpc"])
    assert g.is_server_live() and _grpc_infer(g, _x(1)).as_numpy("logits").shape == (1, 10)
