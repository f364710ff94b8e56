"""The server's front end against the in-process runtime, in one run: `forgetrt bench --url` over REST and
gRPC at batch 1 for several client counts, with the batcher's idle dispatch on and off, beside the
in-process bench on the same bundle.

    python benchmarks/server_frontend.py --bundle forgetrt-demo/bundle --json frontend.json
    python benchmarks/server_frontend.py --bundle forgetrt-demo/bundle --http-compare --json http.json

`--http-compare` instead serves REST alone once per HTTP parser (h11, httptools) and event loop (asyncio,
uvloop), and `--loop-compare` REST and gRPC once per event loop, idle dispatch on, beside the in-process rows.

Servers run one at a time (`forgetrt serve --grpc-port`), the load generator on the same host (on a
2-core machine the two compete: compare rows of one run, not against other machines).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time

from forgetrt.runtime import BatchingConfig, Runtime, RuntimeConfig
from forgetrt.runtime.bench import BenchConfig, run_bench
from forgetrt.runtime.bench_remote import RemoteTarget, run_remote_bench


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(
    bundle: str, idle: bool, http: str | None = None, loop: str = "auto", extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, int, int]:
    port, gport = _free_port(), _free_port()
    cmd = [sys.executable, "-m", "forgetrt.tools.cli", "--log-level", "warning", "serve", bundle]
    cmd += ["--port", str(port), "--device", "cpu", "--backend", "onnxruntime", "--loop", loop]
    cmd += ["--http", http] if http else ["--grpc-port", str(gport)]
    cmd += list(extra)
    cmd += ["--model-name", "m", "--idle-dispatch" if idle else "--no-idle-dispatch", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import http.client

    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/v2/health/ready")
            if c.getresponse().status == 200:
                return proc, port, gport
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--client-processes", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--http-compare", action="store_true", help="REST only, once per HTTP parser (h11, httptools)")
    ap.add_argument("--loop-compare", action="store_true", help="REST and gRPC once per event loop")
    ap.add_argument(
        "--inline-compare", action="store_true", help="REST and gRPC with inline dispatch off (0) and on (default)"
    )
    a = ap.parse_args()
    conc = tuple(int(c) for c in a.concurrency.split(","))
    cfg = BenchConfig(batches=(1,), concurrency=conc, active_vectors=(1,), duration=a.duration, warmup=1.0)
    out: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "rows": []}

    def row(kind: str, rec: dict) -> None:
        r = {
            "kind": kind,
            "concurrency": rec["point"]["concurrency"],
            "requests_per_s": round(rec["throughput"]["requests_per_s"], 1),
            "p50_ms": round(rec["latency"]["p50_ms"], 3),
            "p99_ms": round(rec["latency"]["p99_ms"], 3),
            "errors": rec.get("errors", 0),
        }
        out["rows"].append(r)
        print(json.dumps(r), flush=True)

    batching = BatchingConfig(max_batch_size=64)
    with Runtime.load(
        a.bundle, RuntimeConfig(backend="onnxruntime", device="cpu", batching=batching), {"threads": 1}
    ) as rt:
        for rec in run_bench(rt, cfg, progress=False):
            row("in-process", rec)

    def measure(label: str, idle: bool = True, http: str | None = None, loop: str = "auto", extra=()) -> None:
        """One server (REST alone when ``http`` is given, else REST and gRPC), each protocol over the grid."""
        proc, port, gport = _serve(a.bundle, idle, http, loop, extra)
        urls = [("rest", f"http://127.0.0.1:{port}")] + ([] if http else [("grpc", f"127.0.0.1:{gport}")])
        try:
            for proto, url in urls:
                for rec in run_remote_bench(RemoteTarget(url, "m", proto, a.client_processes), cfg):
                    row(f"{proto}, {label}", rec)
        finally:
            proc.terminate()
            proc.wait(20)

    if a.http_compare:
        for http, loop in (("h11", "asyncio"), ("httptools", "asyncio"), ("h11", "uvloop"), ("httptools", "uvloop")):
            measure(f"{http}, {loop}", http=http, loop=loop)
    elif a.loop_compare:
        for loop in ("asyncio", "uvloop"):
            measure(loop, loop=loop)
    elif a.inline_compare:
        for inline in ("0", "1000"):
            measure(f"inline {'off' if inline == '0' else 'on'}", extra=("--inline-max-us", inline))
    else:
        for idle in (False, True):
            measure(f"idle dispatch {'on' if idle else 'off'}", idle=idle)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
