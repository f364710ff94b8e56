"""`forgetrt infer` and `forgetrt serve` as a user runs them."""

import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from forgetrt.tools.cli import cli


def test_infer_cli_on_png_and_npy(digits_bundle, digits, tmp_path):
    img = digits.x_test[digits.y_test == 3][0, 0]
    Image.fromarray((img.astype(np.float32) / 16 * 255).astype(np.uint8)).save(tmp_path / "three.png")
    np.save(tmp_path / "three.npy", (img / 16.0).astype(np.float32)[None])
    r = CliRunner().invoke(
        cli,
        [
            "infer",
            str(digits_bundle),
            "--image",
            str(tmp_path / "three.png"),
            "--image",
            str(tmp_path / "three.npy"),
            "--backend",
            "onnxruntime",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "bank version 0" in r.output and r.output.count("three.") == 2
    r = CliRunner().invoke(
        cli, ["infer", str(digits_bundle), "--image", str(tmp_path / "three.npy"), "--policy", "eu", "--device", "cpu"]
    )
    assert r.exit_code == 0 and "forget eu" in r.output
    r = CliRunner().invoke(
        cli,
        ["infer", str(digits_bundle), "--image", str(tmp_path / "three.npy"), "--forget", "nope", "--device", "cpu"],
    )
    assert r.exit_code == 2 and "unknown vector 'nope'" in r.output
    # torch backend options: the same prediction in bf16 with BN folding; an option the chosen backend does
    # not take, or a value it refuses, is a clear usage error
    r = CliRunner().invoke(
        cli,
        [
            "infer",
            str(digits_bundle),
            "--image",
            str(tmp_path / "three.npy"),
            "--backend",
            "torch",
            "--device",
            "cpu",
            "--precision",
            "bf16",
            "--fuse",
            "bn",
            "--top",
            "1",
        ],
    )
    assert r.exit_code == 0 and "backend torch on cpu" in r.output and ": 3 " in r.output, r.output
    r = CliRunner().invoke(
        cli,
        [
            "infer",
            str(digits_bundle),
            "--image",
            str(tmp_path / "three.npy"),
            "--backend",
            "onnxruntime",
            "--device",
            "cpu",
            "--precision",
            "bf16",
        ],
    )
    assert r.exit_code == 2 and "backend 'onnxruntime' takes no option 'precision'" in r.output, r.output
    r = CliRunner().invoke(
        cli,
        [
            "infer",
            str(digits_bundle),
            "--image",
            str(tmp_path / "three.npy"),
            "--backend",
            "torch",
            "--device",
            "cpu",
            "--fuse",
            "cudnn",
        ],
    )
    assert r.exit_code == 4 and "fuse 'cudnn' needs CUDA" in r.output, r.output  # 4: backend unavailable
    (tmp_path / "bad.png").write_bytes(b"not an image")
    r = CliRunner().invoke(cli, ["infer", str(digits_bundle), "--image", str(tmp_path / "bad.png"), "--device", "cpu"])
    assert r.exit_code == 2 and "cannot read image" in r.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("access_log", [False, True])
def test_serve_cli_end_to_end(digits_bundle, access_log):
    """Served as a user starts it (default log level info); uvicorn's access log only when asked for."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "forgetrt.tools.cli",
            "serve",
            str(digits_bundle),
            "--port",
            str(port),
            "--backend",
            "onnxruntime",
            "--device",
            "cpu",
            "--model-name",
            "digits",
            *(["--access-log"] if access_log else []),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        x = np.zeros((1, 1, 8, 8), np.float32)
        body = {
            "inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": x.ravel().tolist()}],
            "parameters": {"policy": "eu"},
        }
        r = httpx.post(f"{url}/v2/models/digits/infer", json=body, timeout=10)
        assert r.status_code == 200 and len(r.json()["outputs"][0]["data"]) == 10
        assert httpx.get(f"{url}/v2/models/other", timeout=5).status_code == 404
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0].decode()
    assert "serving" in out
    assert ('"POST /v2/models/digits/infer HTTP/1.1" 200' in out) == access_log, out


def test_serve_cli_missing_bundle(tmp_path):
    r = CliRunner().invoke(cli, ["serve", str(tmp_path / "nope"), "--device", "cpu"])
    assert r.exit_code == 3 and "not found" in r.output
