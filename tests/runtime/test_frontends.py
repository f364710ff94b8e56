"""Front-end processes feeding one engine process (`forgetrt serve --workers N`): the wire between them
(in one event loop, fast), and the processes themselves (restarted when they die, gone when the engine
goes, bank changes seen by all). The KServe protocol suite in test_protocols.py also runs against them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from forgetrt.runtime import BatchingConfig, Runtime, RuntimeConfig
from forgetrt.runtime.control import ControlDisabled, ControlPlane, Unauthorized
from forgetrt.runtime.errors import EngineError, InvalidInputError, UnknownNameError
from forgetrt.runtime.frontends import (
    _HEAD,
    EngineHub,
    EngineUnavailable,
    FrontEndPool,
    RemoteService,
    _error_classes,
    _Framed,
    _raise_payload,
)
from forgetrt.runtime.server import ServerMetrics
from forgetrt.runtime.service import (
    InferCall,
    ModelService,
    OutputRequest,
    RequestParameters,
    parse_request_parameters,
    status_for,
)

TOKEN = "frontends-test-token-0123456789"


@pytest.fixture(scope="module")
def rt(digits_bundle):
    r = Runtime.load(
        digits_bundle, RuntimeConfig(backend="onnxruntime", device="cpu", batching=BatchingConfig(max_batch_size=16))
    )
    yield r
    r.close()


def _x(n=2, seed=0, lo=0.0, hi=1.0):
    return np.random.default_rng(seed).uniform(lo, hi, (n, 1, 8, 8)).astype(np.float32)


def _linked(rt, body, *, control=ControlPlane(), token_digest=None):
    """Run ``body(front, engine_svc, engine_sock)`` with a RemoteService wired to an EngineHub in one loop."""
    metrics = ServerMetrics()
    svc = ModelService(rt, "digits", metrics=metrics, control=control)

    async def main():
        a, b = socket.socketpair()
        hub = EngineHub(svc, metrics)
        await hub.attach(a)
        front = RemoteService(rt.iospec, "digits", token_digest=token_digest)
        await front.connect(b)
        try:
            return await body(front, svc, a)
        finally:
            a.close()
            b.close()

    return asyncio.run(main()), svc, metrics


def test_inference_over_the_wire_is_the_runtime_answer(rt):
    x = _x(3)

    async def body(front, svc, _):
        out = {}
        for key, params in {
            "none": {},
            "names": {"forget": "forget-3,forget-7"},
            "weights": {"forget": "forget-3=1,forget-7=0.5"},
            "object": {"forget": {"forget-2": 0.25}},
            "policy": {"policy": "eu"},
        }.items():
            out[key] = await front.infer(InferCall(x, None, parse_request_parameters(params)))
        coeffs = np.zeros((3, rt.snapshot.k), np.float32)
        coeffs[:, 1] = [1.0, 0.5, 0.0]
        out["coeffs"] = await front.infer(InferCall(x, coeffs))
        out["top"] = await front.infer(InferCall(x, outputs=[OutputRequest("logits", class_count=2)]))
        return out

    out, svc, _ = _linked(rt, body)
    want = {
        "none": rt.infer(x).logits,
        "names": rt.infer(x, ["forget-3", "forget-7"]).logits,
        "weights": rt.infer(x, {"forget-3": 1.0, "forget-7": 0.5}).logits,
        "object": rt.infer(x, {"forget-2": 0.25}).logits,
        "policy": rt.infer(x, "eu").logits,
    }
    for key, logits in want.items():
        np.testing.assert_allclose(out[key].logits, logits, atol=1e-5, err_msg=key)
        assert out[key].bank_version == rt.snapshot.version
    coeffs = np.zeros((3, rt.snapshot.k), np.float32)
    coeffs[:, 1] = [1.0, 0.5, 0.0]
    np.testing.assert_allclose(out["coeffs"].logits, rt.infer(x, coeffs=coeffs).logits, atol=1e-5)
    top = out["top"]
    assert top.classes.shape == (3, 2)
    assert [int(c.decode().split(":")[1]) for c in top.classes[:, 0]] == list(np.argmax(top.logits, 1))
    assert svc.stats.inference_count == 3 * 7  # the engine keeps the model's statistics


def test_a_lone_request_runs_at_once_on_the_engine_when_the_runtime_would_run_it_inline(digits_bundle):
    x = _x(1, seed=9)
    cfg = RuntimeConfig(backend="onnxruntime", device="cpu", batching=BatchingConfig(max_batch_size=16))
    with Runtime.load(digits_bundle, cfg) as r:
        assert r.infer_now(x, ["forget-3"]) is None  # this size has not run on this bank yet
        asyncio.run(r.infer_async(x, ["forget-3"]))
        got = r.infer_now(x, ["forget-3"])
        np.testing.assert_allclose(got.logits, r.infer(x, ["forget-3"]).logits, atol=1e-6)
        with pytest.raises(UnknownNameError):
            r.infer_now(x, ["nope"])
        ran = []
        svc = ModelService(r, "digits")
        orig = svc.infer_now
        svc.infer_now = lambda call: ran.append(orig(call)) or ran[-1]

        async def body():
            a, b = socket.socketpair()
            await EngineHub(svc).attach(a)
            front = RemoteService(r.iospec, "digits")
            await front.connect(b)
            outs = [await front.infer(InferCall(x, None, RequestParameters(forget=["forget-3"]))) for _ in range(5)]
            a.close()
            b.close()
            return outs

        outs = asyncio.run(body())
        assert len(ran) == 5 and all(o is not None for o in ran)  # one at a time: each ran at once
        for o in outs:
            np.testing.assert_allclose(o.logits, got.logits, atol=1e-6)
    off = RuntimeConfig(
        backend="onnxruntime", device="cpu", batching=BatchingConfig(max_batch_size=16, inline_max_us=0)
    )
    with Runtime.load(digits_bundle, off) as r:
        asyncio.run(r.infer_async(x))
        assert r.infer_now(x) is None  # inline dispatch off: never


def test_errors_cross_the_wire_with_their_types(rt, monkeypatch):
    x = _x(1)

    async def body(front, svc, _):
        got = []
        for call in (
            InferCall(x, None, RequestParameters(forget=["nope"])),  # unknown vector
            InferCall(_x(1, lo=2.0, hi=3.0)),  # pixels outside the input range
            InferCall(x, np.zeros((1, 3), np.float32)),  # coeffs of the wrong width
            InferCall(x, None, RequestParameters(forget="no-such-policy")),
        ):
            with pytest.raises(Exception) as e:
                await front.infer(call)
            got.append(e.value)

        async def boom(*_, **__):
            raise RuntimeError("secret internals /etc/passwd")

        def boom_now(*_, **__):
            raise RuntimeError("secret internals /etc/passwd")

        monkeypatch.setattr(svc, "infer", boom)
        monkeypatch.setattr(svc, "infer_now", boom_now)
        with pytest.raises(EngineError) as e:
            await front.infer(InferCall(x))
        got.append(e.value)
        return got

    got, _, _ = _linked(rt, body)
    assert isinstance(got[0], UnknownNameError) and "nope" in str(got[0]) and status_for(got[0]) == 400
    assert isinstance(got[1], InvalidInputError) and "pixels" in str(got[1])
    assert isinstance(got[2], InvalidInputError) and "coeffs" in str(got[2])
    assert isinstance(got[3], UnknownNameError)
    assert status_for(got[4]) == 500 and "secret" not in str(got[4])  # nothing of the engine's internals leaks


def test_many_requests_in_one_read_are_answered_each_with_its_own_result_or_error(rt):
    """Requests sent in one loop turn arrive in one read and go straight to the batcher, each answered from
    its future's callback: good and bad ones mixed, every answer is its own."""
    from forgetrt.runtime.errors import DeadlineExceededError

    xs = [_x(1, seed=i) for i in range(40)]

    def call(i):
        if i % 5 == 1:
            return InferCall(xs[i], None, RequestParameters(forget=["nope"]))
        if i % 5 == 2:
            return InferCall(_x(1, seed=i, lo=2.0, hi=3.0))
        if i % 5 == 3:
            return InferCall(xs[i], None, RequestParameters(forget=["forget-3"], timeout_us=1))
        return InferCall(xs[i], None, RequestParameters(forget={"forget-1": 0.5 * (i % 3)}))

    async def body(front, svc, _):
        submitted = []
        orig = svc.submit

        def counted(c):
            submitted.append(1)
            return orig(c)

        svc.submit = counted
        got = await asyncio.gather(*(front.infer(call(i)) for i in range(40)), return_exceptions=True)
        return got, len(submitted)

    (got, submitted), _, _ = _linked(rt, body)
    assert submitted >= 39  # (at most one lone request may have taken the coroutine path)
    for i, r in enumerate(got):
        if i % 5 == 1:
            assert isinstance(r, UnknownNameError), (i, r)
        elif i % 5 == 2:
            assert isinstance(r, InvalidInputError) and "pixels" in str(r), (i, r)
        elif i % 5 == 3:
            assert isinstance(r, DeadlineExceededError) or not isinstance(r, Exception), (i, r)
        else:
            want = rt.infer(xs[i], {"forget-1": 0.5 * (i % 3)}).logits
            np.testing.assert_allclose(r.logits, want, atol=1e-5, err_msg=str(i))
    assert any(isinstance(r, DeadlineExceededError) for r in got)  # 1 us is past by the time a batch runs


def test_a_request_its_client_gave_up_on_is_cancelled_on_the_engine_and_not_counted(digits_bundle, caplog):
    """A gRPC deadline or a cancelled call cancels the front end's wait; the engine hears of it, so the
    batcher skips the job and nothing is counted as served (as in one process)."""
    cfg = RuntimeConfig(
        backend="onnxruntime",
        device="cpu",
        batching=BatchingConfig(max_batch_size=16, max_queue_delay_us=300_000, idle_dispatch=False, inline_max_us=0),
    )
    with Runtime.load(digits_bundle, cfg) as r:
        executions = []
        r._batcher._observer = lambda *a: executions.append(a)

        async def body(front, svc, _):
            calls = [InferCall(_x(1, seed=i)) for i in range(3)]
            with pytest.raises(asyncio.TimeoutError):  # one alone (the coroutine path on the engine)
                await asyncio.wait_for(front.infer(calls[0]), 0.05)
            many = [asyncio.wait_for(front.infer(c), 0.05) for c in calls[1:]]  # together (the callback path)
            got = await asyncio.gather(*many, return_exceptions=True)
            await asyncio.sleep(0.6)  # past the batcher's collection delay
            return got, (await svc.statistics())["model_stats"][0], svc.inflight

        (got, stats, inflight), _, _ = _linked(r, body)
    assert all(isinstance(g, asyncio.TimeoutError) for g in got)
    assert stats["inference_stats"]["success"]["count"] == 0 and stats["inference_count"] == 0
    assert executions == [] and inflight == 0  # the engine never ran them
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # a client's deadline is not an error


def test_a_cancel_in_the_same_read_as_its_request_drops_it(rt):
    """A busy engine reads a request and its cancel together: the request is never run."""
    from forgetrt.runtime.frontends import _CANCEL, _INFER, _REQ

    x = _x(1)
    forget = json.dumps(["forget-3"]).encode()
    req = _REQ.pack(0, -1, len(forget), 1, 1, 8, 8, 0, 0) + forget + x.tobytes()
    frames = _HEAD.pack(9 + len(req), _INFER, 1) + req + _HEAD.pack(9, _CANCEL, 1)
    frames += _HEAD.pack(9 + len(req), _INFER, 2) + req  # and one that stays

    async def body(front, svc, engine_sock):
        ran = []
        orig_submit, orig_now = svc.submit, svc.infer_now
        svc.submit = lambda c: ran.append("submit") or orig_submit(c)
        svc.infer_now = lambda c: ran.append("now") or orig_now(c)
        answers = []
        front.link.frame = lambda kind, rid, payload: answers.append(rid)
        front.link.transport.write(frames)
        await asyncio.sleep(0.5)
        return ran, answers

    (ran, answers), svc, _ = _linked(rt, body)
    assert answers == [2] and len(ran) == 1 and svc.inflight == 0


def test_errors_read_as_in_one_process_and_oversized_forget_parameters_are_refused(rt):
    from forgetrt.runtime.service import MAX_FORGET_ITEMS, parse_forget

    x64 = _x(1).astype(np.float64)

    async def body(front, svc, _):
        with pytest.raises(InvalidInputError) as remote:
            await front.infer(InferCall(x64))
        return str(remote.value)

    msg, _, _ = _linked(rt, body)
    with pytest.raises(InvalidInputError) as local:
        rt.infer(x64)
    assert msg == str(local.value)  # the same words with and without front ends
    for bad in (
        ",".join(f"v{i}" for i in range(MAX_FORGET_ITEMS + 1)),
        "x" * ((1 << 20) + 1),
        json.dumps({f"v{i}": 1 for i in range(MAX_FORGET_ITEMS + 1)}),
        [f"v{i}" for i in range(MAX_FORGET_ITEMS + 1)],
        ["n" * 900 + str(i) for i in range(1200)],  # few names, over 1 MiB of them
        {"n" * 900 + str(i): 1.0 for i in range(1200)},
    ):
        with pytest.raises(InvalidInputError, match="forget"):
            parse_forget(bad)


def test_a_grpc_port_held_by_anyone_is_refused():
    from forgetrt.runtime.frontends import _reserve_port

    # a port whose last server closed its connections first (TIME_WAIT) is free, as for one process
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = listener.accept()
        conn.close()  # the server side closes first: its end of the connection waits in TIME_WAIT
        time.sleep(0.1)
        client.close()
    _reserve_port("127.0.0.1", port).close()

    held = _reserve_port("127.0.0.1", 0)
    serving = socket.socket()  # a running --workers server's front ends listen with both options, as grpc does
    serving.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    serving.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    serving.bind(("127.0.0.1", held.getsockname()[1]))
    serving.listen()
    try:
        with pytest.raises(InvalidInputError, match="cannot listen for gRPC"):
            _reserve_port("127.0.0.1", held.getsockname()[1])
        with socket.socket() as plain:
            plain.bind(("127.0.0.1", 0))
            plain.listen()
            with pytest.raises(InvalidInputError, match="cannot listen for gRPC"):
                _reserve_port("127.0.0.1", plain.getsockname()[1])
    finally:
        serving.close()
        held.close()


def test_an_error_type_the_front_end_does_not_know_becomes_its_nearest_known_base():
    classes = _error_classes()
    raw = json.dumps({"type": ["PluginError", "InvalidInputError", "ForgetRTError"], "message": "m"}).encode()
    e = _raise_payload(raw, classes)
    assert type(e) is InvalidInputError and str(e) == "m"
    assert type(_raise_payload(json.dumps({"type": ["Nope"], "message": "x"}).encode(), classes)) is EngineError


def test_frames_split_or_joined_anywhere_are_read_whole():
    got = []

    class Sink(_Framed):
        def frame(self, kind, rid, payload):
            got.append((kind, rid, bytes(payload)))

    async def main():
        s = Sink()
        frames = b"".join(
            _HEAD.pack(9 + len(p), k, r) + p for k, r, p in [(1, 7, b"abc"), (2, 8, b""), (3, 9, b"x" * 70000)]
        )
        for i in range(0, len(frames), 5):  # five bytes at a time
            s.data_received(frames[i : i + 5])
        s.data_received(frames)  # all at once
        return s

    asyncio.run(main())
    want = [(1, 7, b"abc"), (2, 8, b""), (3, 9, b"x" * 70000)]
    assert got == want + want


def test_calls_counts_and_the_control_plane_go_to_the_engine(rt, tmp_path, digits_bank):
    root = tmp_path / "banks"
    shutil.copytree(digits_bank[0], root / "v2")
    control = ControlPlane(TOKEN, root, tmp_path / "state")
    import hashlib

    digest = hashlib.sha256(TOKEN.encode()).digest()

    async def body(front, svc, _):
        assert await front.metadata() == await svc.metadata()
        assert await front.config() == await svc.config()
        assert await front.readiness() is None
        front.count_failure(InvalidInputError("bad body"), 400)
        front.metrics.responses.labels(route="/v2/models/{model}/infer", status="400").inc()
        stats = await front.statistics()  # flushes this front end's counts first
        text = (await front.exposition(None)).decode()
        with pytest.raises(Unauthorized):
            await front.load_bank("Bearer wrong-token-wrong-token", "v2", "t")
        res = await front.load_bank(f"Bearer {TOKEN}", "v2", "t")
        after = await front.infer(InferCall(_x(1)))
        return stats, text, res, after

    (stats, text, res, after), svc, _ = _linked(rt, body, control=control, token_digest=digest)
    assert stats["model_stats"][0]["inference_stats"]["fail"]["count"] == 1
    assert 'forgetrt_request_failures_total{error="InvalidInputError"} 1.0' in text
    assert 'forgetrt_http_responses_total{route="/v2/models/{model}/infer",status="400"} 1.0' in text
    assert res["bank"] == "v2" and after.bank_version == res["bank_version"] == rt.snapshot.version > 0
    audit = (tmp_path / "state" / "audit.jsonl").read_text()
    assert '"outcome": "ok"' in audit  # the engine's control plane recorded it

    async def disabled(front, svc, _):
        with pytest.raises(ControlDisabled):
            await front.load_bank(f"Bearer {TOKEN}", "v2", "t")

    _linked(rt, disabled)


def test_a_front_end_whose_engine_is_gone_answers_503_and_is_unready(rt):
    async def body(front, svc, engine_sock):
        started = asyncio.get_running_loop().create_future()
        release = asyncio.Event()

        async def slow(*_, **__):
            started.set_result(None)
            await release.wait()

        svc.infer = slow
        svc.infer_now = lambda call: None  # not run at once: it takes the path that waits
        pending = asyncio.ensure_future(front.infer(InferCall(_x(1))))
        await started
        engine_sock.shutdown(socket.SHUT_RDWR)  # the engine process dies with a request in flight
        with pytest.raises(EngineUnavailable) as e:
            await pending
        with pytest.raises(EngineUnavailable):
            await front.infer(InferCall(_x(1)))
        release.set()
        return e.value, await front.readiness()

    (err, why), _, _ = _linked(rt, body)
    assert status_for(err) == 503 and "engine" in why


# ---------------------------------------------------------------------------------------------- processes


class _Pool:
    """A FrontEndPool on its own loop thread (this test process is the engine process)."""

    def __init__(self, svc, **kw):
        self.pool = FrontEndPool(svc, port=0, log_level="warning", **kw)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self.pool.start())
        self.url = f"http://127.0.0.1:{self.pool.http_port}"
        self.wait_ready()

    def run(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def wait_ready(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise TimeoutError("front ends not ready")

    def close(self):
        self.run(self.pool.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _infer(url, bank_version=None):
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": _x(1).ravel().tolist()}]}
    with httpx.Client(timeout=10) as c:  # a new connection each time: it may reach any front end
        return c.post(f"{url}/v2/models/digits/infer", json=body)


def test_a_killed_front_end_is_started_again_and_bank_changes_reach_every_front_end(rt, tmp_path, digits_bank):
    root = tmp_path / "banks"
    shutil.copytree(digits_bank[0], root / "v2")
    control = ControlPlane(TOKEN, root, tmp_path / "state")
    metrics = ServerMetrics()
    svc = ModelService(rt, "digits", metrics=metrics, control=control)
    p = _Pool(svc, workers=2, control=control, metrics=metrics)
    try:
        victim = p.pool.pids()[0]
        deadline = time.time() + 30
        while not _group(victim) - {victim} and time.time() < deadline:  # its parse pool starts with it
            time.sleep(0.1)
        left = _group(victim) - {victim}
        assert left, "a front end's parse pool runs in its process group"
        os.kill(victim, signal.SIGKILL)
        deadline = time.time() + 30
        while p.pool.restarts < 1 and time.time() < deadline:
            time.sleep(0.1)
        assert p.pool.restarts == 1 and victim not in p.pool.pids() and len(p.pool.pids()) == 2
        deadline = time.time() + 10
        while any(_alive(c) for c in left) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(c) for c in left)  # what the killed front end left behind is reaped
        p.wait_ready()
        assert all(_infer(p.url).status_code == 200 for _ in range(10))

        r = httpx.post(f"{p.url}/v2/repository/models/digits/load", json={"parameters": {"bank": "v2"}}, timeout=20)
        assert r.status_code == 401  # checked in the front end, before the engine hears of it
        r = httpx.post(
            f"{p.url}/v2/repository/models/digits/load",
            json={"parameters": {"bank": "v2"}},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=20,
        )
        assert r.status_code == 200, r.text
        version = r.json()["bank_version"]
        versions = {_infer(p.url).json()["parameters"]["bank_version"] for _ in range(12)}
        assert versions == {version}  # whichever front end answers: the bank acknowledged, never the old one
    finally:
        p.close()
    assert not any(w.process.is_alive() for w in p.pool._procs.values())


def _group(pgid):
    """The live processes in process group ``pgid``."""
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.add(int(d))
    return out


def test_a_stopping_server_refuses_new_connections_while_it_drains(rt):
    svc = ModelService(rt, "digits")
    orig = svc.infer

    async def slow(call, **kw):
        await asyncio.sleep(2.0)
        return await orig(call, **kw)

    svc.infer, svc.infer_now = slow, lambda call: None
    p = _Pool(svc, workers=1)
    results = {}
    th = threading.Thread(target=lambda: results.setdefault("r", _infer(p.url)))
    th.start()
    time.sleep(0.5)  # the request is in flight
    stopping = asyncio.run_coroutine_threadsafe(p.pool.stop(grace_s=10), p.loop)
    time.sleep(0.5)
    t0 = time.time()
    with pytest.raises(httpx.ConnectError):  # refused at once, not left waiting in a backlog
        httpx.get(f"{p.url}/v2/health/live", timeout=5)
    assert time.time() - t0 < 1.0
    stopping.result(30)
    th.join(10)
    assert results["r"].status_code == 200  # what was in flight finished
    p.loop.call_soon_threadsafe(p.loop.stop)
    p.thread.join(10)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_serve_workers_cli_stops_cleanly_and_front_ends_never_outlive_the_engine(digits_bundle, how):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "forgetrt.tools.cli", "serve", str(digits_bundle), "--port", str(port)]
        + ["--device", "cpu", "--workers", "2", "--model-name", "digits"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    try:
        pids = None
        deadline = time.time() + 60
        while pids is None and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if m := re.search(r"front-end processes \(pids ([\d,]+)\)", line):
                pids = [int(v) for v in m.group(1).split(",")]
        assert pids and len(pids) == 2, "".join(lines)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if _infer(url).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert _infer(url).json()["model_name"] == "digits"
        proc.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGKILL)
        code = proc.wait(30)
        assert code == (0 if how == "SIGTERM" else -signal.SIGKILL), "".join(lines) + proc.stdout.read()
        deadline = time.time() + 20
        while any(_alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids)  # with the engine gone, nothing is left listening
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_workers_option_is_checked(digits_bundle):
    from click.testing import CliRunner

    from forgetrt.tools.cli import cli

    r = CliRunner().invoke(cli, ["serve", str(digits_bundle), "--workers", "0"])
    assert r.exit_code == 2 and "--workers" in r.output
    r = CliRunner().invoke(cli, ["serve", str(digits_bundle), "--workers", "2", "--ray"])
    assert r.exit_code == 2 and "--workers is not available with --ray" in r.output
    with pytest.raises(InvalidInputError, match="workers"):
        FrontEndPool(ModelService.__new__(ModelService), workers=0)
