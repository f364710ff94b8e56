"""Operations: readiness that turns false while a bank loads, while the engine keeps failing or while a
replica may not serve; log level and JSON logs; progress bars only on a terminal; serve options from
FORGETRT_SERVE_* variables."""

from __future__ import annotations

import io
import json
import logging
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from forgetrt.runtime import Runtime, RuntimeConfig
from forgetrt.runtime.control import ControlPlane
from forgetrt.runtime.errors import EngineError, UnknownNameError
from forgetrt.runtime.logs import JsonFormatter, configure_logging, progress
from forgetrt.runtime.server import create_app
from forgetrt.runtime.service import ENGINE_FAILURES_UNREADY
from forgetrt.tools.cli import cli

TOKEN = "operations-token-0123456789"


@pytest.fixture()
def runtime(digits_bundle):
    with Runtime.load(digits_bundle, RuntimeConfig(backend="onnxruntime", device="cpu")) as rt:
        yield rt


def _infer(c: TestClient):
    x = np.zeros((1, 1, 8, 8), np.float32).ravel().tolist()
    return c.post(
        "/v2/models/digits/infer",
        json={"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": x}]},
    )


def test_readiness_turns_false_while_the_engine_keeps_failing_and_back_once_a_probe_passes(runtime, monkeypatch):
    c = TestClient(create_app(runtime, "digits"))
    assert c.get("/v2/health/ready").status_code == 200
    real = runtime.infer_async
    broken = {"on": True}

    async def flaky(*a, **k):
        if broken["on"]:
            raise EngineError("the backend failed on a batch of 1 images: CUDA error")
        return await real(*a, **k)

    monkeypatch.setattr(runtime, "infer_async", flaky)
    for _ in range(ENGINE_FAILURES_UNREADY - 1):
        assert _infer(c).status_code == 500
    assert c.get("/v2/health/ready").status_code == 200  # one or two failures: still ready
    assert _infer(c).status_code == 500
    r = c.get("/v2/health/ready")
    assert r.status_code == 503 and "engine is failing" in r.json()["reason"]
    assert c.get("/v2/models/digits/ready").status_code == 503
    broken["on"] = False  # the engine recovers: the next readiness probe runs one image and passes
    assert c.get("/v2/health/ready").json() == {"ready": True}
    assert _infer(c).status_code == 200


def test_readiness_is_false_while_a_bank_loads(runtime, digits_bank, tmp_path, monkeypatch):
    root = tmp_path / "banks"
    shutil.copytree(digits_bank[0], root / "v2")
    control = ControlPlane(TOKEN, root, tmp_path / "state")
    app = create_app(runtime, "digits", control=control)
    seen = {}
    real = ControlPlane.load_bank

    def slow_load(self, rt, raw, caller):
        with TestClient(app) as other:  # a probe arriving while the load runs
            seen["ready"] = other.get("/v2/health/ready")
            seen["infer"] = _infer(other).status_code  # the old bank keeps serving meanwhile
        return real(self, rt, raw, caller)

    monkeypatch.setattr(ControlPlane, "load_bank", slow_load)
    c = TestClient(app)
    r = c.post(
        "/v2/repository/models/digits/load",
        json={"parameters": {"bank": "v2"}},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert r.status_code == 200, r.text
    assert seen["ready"].status_code == 503 and "loading bank 'v2'" in seen["ready"].json()["reason"]
    assert seen["infer"] == 200
    assert c.get("/v2/health/ready").status_code == 200


def test_an_admission_hook_refuses_with_json_503_and_unreadiness(runtime):
    gate = {"why": None}
    c = TestClient(create_app(runtime, "digits", admission=lambda: gate["why"], instance="r1"))
    r = _infer(c)
    assert r.status_code == 200 and r.headers["x-forgetrt-instance"] == "r1"
    gate["why"] = "lease lapsed"
    r = _infer(c)
    assert r.status_code == 503 and r.json() == {"error": "lease lapsed"}
    ready = c.get("/v2/health/ready")
    assert ready.json() == {"ready": False, "reason": "lease lapsed"}
    assert c.get("/v2/health/live").status_code == 200  # alive, just not taking traffic
    # every answer names its server, refusals and errors too (which replica of several refused?)
    for answer in (r, ready, c.get("/v2/health/live"), c.get("/no/such/route")):
        assert answer.headers.get_list("x-forgetrt-instance") == ["r1"], answer.headers


def test_json_logs_are_one_object_per_line_with_extras():
    buf = io.StringIO()
    configure_logging("debug", "json", stream=buf)
    try:
        logging.getLogger("forgetrt.test").info("bank %s loaded", "v2", extra={"bank_version": 3})
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("forgetrt.test").exception("failed")
    finally:
        configure_logging("warning", "text")
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert lines[0]["message"] == "bank v2 loaded" and lines[0]["bank_version"] == 3
    assert lines[0]["level"] == "info" and lines[0]["logger"] == "forgetrt.test" and lines[0]["time"].endswith("Z")
    assert "ValueError: boom" in lines[1]["exception"]
    assert JsonFormatter().format(logging.makeLogRecord({"msg": "x"}))  # a bare record formats
    with pytest.raises(UnknownNameError):
        configure_logging("verbose")
    with pytest.raises(UnknownNameError):
        configure_logging("info", "xml")


def test_progress_bars_draw_only_on_a_terminal(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert progress(total=3, file=io.StringIO()).disable  # a pipe or log file: no bar
    bar = progress(total=3, file=Tty())
    assert not bar.disable
    bar.close()
    assert progress(total=3, file=Tty(), disable=True).disable  # a caller's explicit off wins
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert progress(total=3, file=Tty()).disable


def test_serve_options_come_from_the_environment(tmp_path):
    r = CliRunner().invoke(cli, ["serve", str(tmp_path / "nope")], env={"FORGETRT_SERVE_PORT": "not-a-port"})
    assert r.exit_code == 2 and "--port" in r.output
    r = CliRunner().invoke(cli, ["serve"], env={"FORGETRT_SERVE_BUNDLE": str(tmp_path / "nope")})
    assert r.exit_code == 3 and "not found" in r.output  # the bundle came from the environment
    r = CliRunner().invoke(cli, ["serve", str(tmp_path / "nope")], env={"FORGETRT_SERVE_REPLICAS": "3"})
    assert r.exit_code == 2 and "--replicas needs --ray" in r.output
    r = CliRunner().invoke(cli, ["serve", "--help"])
    assert "FORGETRT_SERVE_MAX_BATCH_SIZE" in r.output and "FORGETRT_SERVE_RAY" in r.output
    r = CliRunner().invoke(cli, ["--log-level", "loud", "models"])
    assert r.exit_code == 2
    r = CliRunner().invoke(cli, ["models"], env={"FORGETRT_LOG_LEVEL": "chatty"})
    assert r.exit_code == 2 and "log-level" in r.output


def test_engine_failures_are_counted_per_server(runtime, monkeypatch):
    a, b = TestClient(create_app(runtime, "digits")), TestClient(create_app(runtime, "digits"))

    async def boom(*_, **__):
        raise EngineError("down")

    monkeypatch.setattr(runtime, "infer_async", boom)
    for _ in range(ENGINE_FAILURES_UNREADY):
        assert _infer(a).status_code == 500
    assert a.get("/v2/health/ready").status_code == 503  # its probe fails on the broken engine
    assert b.get("/v2/health/ready").status_code == 200  # b saw no failure: it does not probe
    monkeypatch.undo()
    assert a.get("/v2/health/ready").status_code == 200
