"""A live server with small limits (so the tests can reach them quickly) on loopback, and helpers."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

TOKEN = "security-test-token-0123456789abcdef"


class Live:
    def __init__(self, app, limits, http: str = "auto") -> None:
        import uvicorn

        from forgetrt.runtime.server import uvicorn_config

        cfg = uvicorn_config(app, limits, host="127.0.0.1", port=0, log_level="critical", http=http)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def raw(self, data: bytes, *, read: bool = True, timeout: float = 5.0) -> bytes:
        """Send raw bytes on a fresh connection and return what comes back until the server closes it."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(data)
            if not read:
                return b""
            out = b""
            try:
                while chunk := s.recv(65536):
                    out += chunk
                    if b"\r\n\r\n" in out and _complete(out):
                        break
            except (TimeoutError, ConnectionResetError):
                pass
            return out

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _complete(resp: bytes) -> bool:
    head, _, body = resp.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


@pytest.fixture(scope="package")
def limits():
    from forgetrt.runtime.limits import ServerLimits

    return ServerLimits(
        max_body_bytes=1 << 20,
        header_timeout_s=1.0,
        body_timeout_s=1.0,
        keep_alive_s=1.0,
        max_connections=40,
        max_inflight=64,
        max_json_depth=32,
    )


@pytest.fixture(scope="package")
def bank_root(tmp_path_factory, digits_bank) -> Path:
    """A bank root with the digits bank under two names, and a bank and a secret outside it."""
    root = tmp_path_factory.mktemp("banks")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(digits_bank[0], root / "v2")
    shutil.copytree(digits_bank[0], root / "nested" / "v3")
    shutil.copytree(digits_bank[0], outside / "evil")
    (outside / "secret.txt").write_text("do not read")
    (root / "escape").symlink_to(outside / "evil")
    (root / "inner-link").symlink_to(root / "v2")
    (root / "not-a-bank").mkdir()
    (root / "plain-file").write_text("x")
    return root


@pytest.fixture(scope="package")
def live(digits_bundle, limits, bank_root, tmp_path_factory):
    """The digits bundle served with a control plane (token, bank root, state dir) and the small limits."""
    from forgetrt.runtime import Runtime, RuntimeConfig
    from forgetrt.runtime.control import ControlPlane
    from forgetrt.runtime.server import ServerMetrics, create_app

    metrics = ServerMetrics()
    rt = Runtime.load(digits_bundle, RuntimeConfig(backend="onnxruntime", device="cpu"), observer=metrics.observe_batch)
    control = ControlPlane(TOKEN, bank_root, tmp_path_factory.mktemp("state"))
    srv = Live(create_app(rt, "digits", metrics=metrics, limits=limits, control=control), limits)
    srv.runtime, srv.metrics, srv.control = rt, metrics, control
    yield srv
    srv.close()
    rt.close()


@pytest.fixture(scope="package")
def live_h11(digits_bundle, limits):
    """The same, on uvicorn's pure-Python h11 protocol (the default is httptools where installed): the
    HTTP-layer guards are tested on both."""
    from forgetrt.runtime import Runtime, RuntimeConfig
    from forgetrt.runtime.server import ServerMetrics, create_app

    metrics = ServerMetrics()
    rt = Runtime.load(digits_bundle, RuntimeConfig(backend="onnxruntime", device="cpu"))
    srv = Live(create_app(rt, "digits", metrics=metrics, limits=limits), limits, http="h11")
    srv.runtime, srv.metrics = rt, metrics
    yield srv
    srv.close()
    rt.close()


@pytest.fixture(scope="package")
def live_open(digits_bundle, limits):
    """The same bundle served without a control plane (the default)."""
    from forgetrt.runtime import Runtime, RuntimeConfig
    from forgetrt.runtime.server import create_app

    rt = Runtime.load(digits_bundle, RuntimeConfig(backend="onnxruntime", device="cpu"))
    srv = Live(create_app(rt, "digits", limits=limits), limits)
    yield srv
    srv.close()
    rt.close()
