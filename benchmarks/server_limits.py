#!/usr/bin/env python
"""What the server's limits cost and guarantee, measured on loopback (digits bundle, onnxruntime CPU):

- memory per open connection (RSS growth of the server process over N idle connections);
- time to refuse a 10 GB Content-Length (413 before any body byte is read);
- a small request's latency (one keep-alive client, back to back) while one large JSON body (100 MB by
  default) is sent, parsed and answered, against the same request on an idle server. Two large bodies:
  one refused after parsing (an unknown output: pure read + parse cost) and one accepted (parsed,
  computed on 130k images, 1.3M logits encoded back). Both with ``--parse-workers 0`` (a thread) and
  ``--parse-workers 1`` (a process), in one run, so the ratio is measured on one machine.

    python benchmarks/server_limits.py --json runs/server_limits.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, bundle: Path, *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "forgetrt.tools.cli", "serve", str(bundle), "--port", str(self.port)]
        cmd += ["--device", "cpu", "--backend", "onnxruntime", "--model-name", "d", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(300):
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


SMALL = json.dumps({"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]})


def small_latencies(client: httpx.Client, url: str, n: int = 40, until=None) -> list[float]:
    ts: list[float] = []
    while len(ts) < n or (until is not None and until()):
        t = time.perf_counter()
        assert client.post(f"{url}/v2/models/d/infer", content=SMALL).status_code == 200
        ts.append((time.perf_counter() - t) * 1e3)
    return ts


def beside_big(url: str, big: bytes) -> dict:
    """Small requests for as long as one large request is in flight."""
    client = httpx.Client(timeout=300)
    idle = small_latencies(client, url)
    result: dict = {}

    def send() -> None:
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v2/models/d/infer", content=big, timeout=300)
        result["seconds"] = time.perf_counter() - t0
        result["status"] = r.status_code
        result["response_bytes"] = len(r.content)
        if r.status_code != 200:
            result["error"] = r.json()["error"][:200]

    th = threading.Thread(target=send)
    th.start()
    time.sleep(0.05)
    busy = small_latencies(client, url, 5, until=th.is_alive)
    th.join()
    return {
        "big": result,
        "small_ms_idle": {"p50": float(np.median(idle)), "max": max(idle)},
        "small_ms_during": {"n": len(busy), "p50": float(np.median(busy)), "max": max(busy)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=500)
    p.add_argument("--big-mb", type=float, default=100.0, help="size of the large JSON body (MB)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    from forgetrt.export.onnx_export import export_onnx
    from forgetrt.train import workflows as wf
    from forgetrt.train.recipes import PRESETS

    work = Path(tempfile.mkdtemp(prefix="forgetrt-limits-"))
    wf.train_model("digits-cnn", "digits", work / "m", device="cpu", epochs=5)
    wf.train_class_vectors(work / "m", "digits", work / "b", recipe=PRESETS["digits"], device="cpu", classes=[0, 1])
    export_onnx(work / "b", work / "bundle", model_dir=work / "m")
    limit = int(a.big_mb * 1e6 * 1.1)  # room for the large body, nothing more
    n_img = int(a.big_mb * 1e6 // (64 * 12))
    inputs = [{"name": "image", "shape": [n_img, 1, 8, 8], "datatype": "FP32", "data": [0.1234567] * (n_img * 64)}]
    accepted = json.dumps({"inputs": inputs}).encode()
    refused = json.dumps({"inputs": inputs, "outputs": [{"name": "not-an-output"}]}).encode()
    res: dict = {
        "machine": {"cpus": os.cpu_count()},
        "big_body": {"bytes": len(accepted), "images": n_img},
    }
    common = ["--max-body-bytes", str(limit), "--max-batch-size", str(n_img), "--instances", "2"]

    # connections and oversized Content-Length (default server)
    srv = Server(work / "bundle", "--max-connections", str(a.connections + 50), "--header-timeout-s", "120")
    try:
        time.sleep(0.5)
        rss0 = _rss_kib(srv.proc.pid)
        socks = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(a.connections)]
        time.sleep(1.0)
        rss1 = _rss_kib(srv.proc.pid)
        for s in socks:
            s.close()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            t = time.perf_counter()
            s.sendall(b"POST /v2/models/d/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 10737418240\r\n\r\n")
            resp = s.recv(4096)
            res["refuse_10GB_ms"] = (time.perf_counter() - t) * 1e3
        assert resp.startswith(b"HTTP/1.1 413"), resp[:60]
        res["connections"] = a.connections
        res["rss_per_connection_kib"] = (rss1 - rss0) / a.connections
    finally:
        srv.close()

    for workers in (0, 1):
        srv = Server(work / "bundle", *common, "--parse-workers", str(workers))
        try:
            key = f"parse_workers_{workers}"
            res[key] = {"refused_after_parse": beside_big(srv.url, refused), "accepted": beside_big(srv.url, accepted)}
            print(key, json.dumps(res[key]), flush=True)
        finally:
            srv.close()
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
