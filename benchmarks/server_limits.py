#!/usr/bin/env python
"""What the server's limits cost and guarantee, measured on loopback (digits bundle, onnxruntime CPU):

- memory per open connection (RSS growth of the server process over N idle connections);
- time to refuse a 10 GB Content-Length (413 before any body byte is read);
- a small request's latency while several near-limit bodies are being sent and parsed at once, against
  the same request on an idle server.

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=500)
    p.add_argument("--big", type=int, default=4, help="near-limit bodies sent at once")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    from forgetrt.export.onnx_export import export_onnx
    from forgetrt.train import workflows as wf
    from forgetrt.train.recipes import PRESETS

    work = Path(tempfile.mkdtemp(prefix="forgetrt-limits-"))
    wf.train_model("digits-cnn", "digits", work / "m", device="cpu", epochs=5)
    wf.train_class_vectors(work / "m", "digits", work / "b", recipe=PRESETS["digits"], device="cpu", classes=[0, 1])
    export_onnx(work / "b", work / "bundle", model_dir=work / "m")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    limit = 16 << 20
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "forgetrt.tools.cli",
            "serve",
            str(work / "bundle"),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--backend",
            "onnxruntime",
            "--max-connections",
            str(a.connections + 50),
            "--header-timeout-s",
            "120",
            "--max-body-bytes",
            str(limit),
            "--model-name",
            "d",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        small = json.dumps(
            {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}
        )

        client = httpx.Client(timeout=30)  # one keep-alive connection, as a real client would use

        def latency(n=40) -> float:
            ts = []
            for _ in range(n):
                t = time.perf_counter()
                assert client.post(f"{url}/v2/models/d/infer", content=small).status_code == 200
                ts.append(time.perf_counter() - t)
            return float(np.median(ts) * 1e3)

        idle_ms = latency()
        time.sleep(0.5)
        rss0 = _rss_kib(proc.pid)
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(a.connections)]
        time.sleep(1.0)
        rss1 = _rss_kib(proc.pid)
        for s in socks:
            s.close()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            t = time.perf_counter()
            s.sendall(b"POST /v2/models/d/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 10737418240\r\n\r\n")
            resp = s.recv(4096)
            refuse_ms = (time.perf_counter() - t) * 1e3
        assert resp.startswith(b"HTTP/1.1 413"), resp[:60]
        n_img = int((limit * 0.9) // (64 * 12))
        big = json.dumps(
            {
                "inputs": [
                    {"name": "image", "shape": [n_img, 1, 8, 8], "datatype": "FP32", "data": [0.1234567] * (n_img * 64)}
                ]
            }
        ).encode()
        statuses = []

        def send_big() -> None:
            statuses.append(httpx.post(f"{url}/v2/models/d/infer", content=big, timeout=120).status_code)

        threads = [threading.Thread(target=send_big) for _ in range(a.big)]
        for th in threads:
            th.start()
        time.sleep(0.2)
        t = time.perf_counter()
        busy_ms = latency(10)
        for th in threads:
            th.join()
        big_s = time.perf_counter() - t
        res = {
            "connections": a.connections,
            "rss_per_connection_kib": (rss1 - rss0) / a.connections,
            "refuse_10GB_ms": refuse_ms,
            "small_request_p50_ms_idle": idle_ms,
            "small_request_p50_ms_while_big": busy_ms,
            "big_bodies": {"count": a.big, "bytes_each": len(big), "statuses": statuses, "seconds_all": big_s},
            "machine": {"cpus": os.cpu_count()},
        }
        print(json.dumps(res, indent=1))
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))
    finally:
        proc.terminate()
        proc.wait(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
