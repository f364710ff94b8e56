"""The server's front end against the in-process runtime, in one run: `forgetrt bench --url` over REST and
gRPC at batch 1 for several client counts, with the batcher's idle dispatch on and off, beside the
in-process bench on the same bundle.

    python benchmarks/server_frontend.py --bundle forgetrt-demo/bundle --json frontend.json
    python benchmarks/server_frontend.py --bundle forgetrt-demo/bundle --http-compare --json http.json

`--wrk PATH` drives REST with Debian's wrk (C, one thread, keep-alive, closed loop per connection) instead
of the Python client, beside it, so the load generator is not the bottleneck it is for tritonclient:
`apt-get download wrk libluajit-5.1-2 libluajit-5.1-common`, `dpkg -x` each into a folder, and pass its
`usr/bin/wrk` (the library folder is found beside it).

`--workers-compare 1,2` serves REST and gRPC once per `--workers` count (front-end processes feeding one
engine process); with `--wrk`, REST is driven by wrk (`--wrk-threads`), and gRPC by the Python client in
either case; each wrk row records the engine's and the front ends' CPU per request. `--engine cuda` serves
on the GPU (torch, CUDA graphs) instead of onnxruntime on the CPU (`benchmarks/gpu_frontend.sh`).

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


#: how the server and the in-process rows run the engine (``--engine``: torch on CUDA with graphs on a GPU host)
ENGINE = ["--device", "cpu", "--backend", "onnxruntime", "--threads", "1"]
WRK_THREADS = 1


def _serve(
    bundle: str, idle: bool, http: str | None = None, loop: str = "auto", extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, int, int]:
    port, gport = _free_port(), _free_port()
    cmd = [sys.executable, "-m", "forgetrt.tools.cli", "--log-level", "warning", "serve", bundle]
    cmd += ["--port", str(port), "--loop", loop, *ENGINE]
    cmd += ["--http", http] if http else ["--grpc-port", str(gport)]
    cmd += list(extra)
    cmd += ["--model-name", "m", "--idle-dispatch" if idle else "--no-idle-dispatch"]
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


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) a process has used so far; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (front ends, their parse pools, multiprocessing's resource tracker)."""
    parents: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parents[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        todo += kids
    return out


def _wrk(wrk: str, bundle: str, port: int, connections: int, duration: float) -> dict:
    """One wrk run: batch-1 binary-extension requests naming one vector; requests/s, percentiles, non-2xx."""
    import re
    import tempfile
    from pathlib import Path

    import numpy as np

    from forgetrt.runtime.bench_remote import rest_binary_request
    from forgetrt.runtime.bundle import Bundle

    b = Bundle.load(bundle)
    spec = b.iospec
    x = np.random.default_rng(0).uniform(0, 1, (1, *spec.shape)).astype(np.float32)
    headers, body = rest_binary_request(spec.image_name, spec.output_name, x, b.manifest.vectors[0])
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "body.bin").write_bytes(body)
        lua = Path(d) / "post.lua"
        lua.write_text(
            'local f = io.open("' + str(Path(d) / "body.bin") + '", "rb")\n'
            'wrk.method = "POST"\nwrk.body = f:read("*all")\nf:close()\n'
            + "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items())
        )
        libs = Path(wrk).resolve().parents[1] / "lib" / "x86_64-linux-gnu"
        env = {**os.environ, "LD_LIBRARY_PATH": str(libs)}
        cmd = [
            wrk,
            f"-t{min(WRK_THREADS, connections)}",
            f"-c{connections}",
            f"-d{max(1, int(duration))}s",
            "--latency",
            "-s",
            str(lua),
        ]
        res = subprocess.run(
            [*cmd, f"http://127.0.0.1:{port}/v2/models/m/infer"], capture_output=True, text=True, env=env, timeout=120
        )
    text = res.stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errs = re.search(r"Socket errors:.*", text)
    return {
        "requests_per_s": float(rps.group(1)) if rps else float("nan"),
        "requests": int(total.group(1)) if total else 0,
        "p50_ms": round(ms("50"), 3),
        "p99_ms": round(ms("99"), 3),
        "errors": int(bad.group(1)) if bad else 0,
        "socket_errors": errs.group(0) if errs else "",
    }


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
    ap.add_argument("--wrk", help="path to a wrk binary: REST rows from wrk beside the Python client's")
    ap.add_argument("--workers-compare", help="comma-separated --workers counts, e.g. 1,2: one server each")
    ap.add_argument(
        "--engine",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cpu: onnxruntime, 1 thread (the CPU rows); cuda: torch with CUDA graphs on the GPU",
    )
    ap.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (at most one per connection)")
    a = ap.parse_args()
    global WRK_THREADS
    WRK_THREADS = a.wrk_threads
    if a.engine == "cuda":
        ENGINE[:] = ["--device", "cuda", "--backend", "torch", "--cuda-graphs"]
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
    engine = (
        (RuntimeConfig(backend="torch", device="cuda", batching=batching), {"cuda_graphs": True})
        if a.engine == "cuda"
        else (RuntimeConfig(backend="onnxruntime", device="cpu", batching=batching), {"threads": 1})
    )
    out["engine"] = a.engine
    with Runtime.load(a.bundle, *engine) as rt:
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

    if a.workers_compare:
        for w in (int(v) for v in a.workers_compare.split(",")):
            proc, port, gport = _serve(a.bundle, True, None, "auto", ("--workers", str(w)))
            try:
                time.sleep(1.0 + 0.3 * w)  # every front end up (the first one answering is not enough)
                for c in conc:
                    if a.wrk:
                        fronts = _descendants(proc.pid)
                        before = (_cpu_s(proc.pid), sum(_cpu_s(p) for p in fronts))
                        r = _wrk(a.wrk, a.bundle, port, c, a.duration)
                        engine_s = _cpu_s(proc.pid) - before[0]
                        front_s = sum(_cpu_s(p) for p in fronts) - before[1]
                        n = r["requests"]  # wrk's count; the CPU includes its few seconds' start and end
                        r["cpu_us_per_request"] = {
                            "engine process": round(1e6 * engine_s / max(n, 1), 1),
                            "front ends (all)": round(1e6 * front_s / max(n, 1), 1),
                        }
                        out["rows"].append({"kind": f"rest, wrk, workers {w}", "concurrency": c, **r})
                        print(json.dumps(out["rows"][-1]), flush=True)
                    one = BenchConfig(batches=(1,), concurrency=(c,), active_vectors=(1,), duration=a.duration)
                    protos = [("grpc", f"127.0.0.1:{gport}")]
                    if not a.wrk:
                        protos.insert(0, ("rest", f"http://127.0.0.1:{port}"))
                    for proto, url in protos:
                        for rec in run_remote_bench(RemoteTarget(url, "m", proto, a.client_processes), one):
                            row(f"{proto}, python client, workers {w}", rec)
            finally:
                proc.terminate()
                proc.wait(20)
    elif a.wrk:
        proc, port, _ = _serve(a.bundle, True, "auto")
        try:
            for c in conc:
                for label, fn in (("python client", None), ("wrk", _wrk)):
                    if fn is None:
                        one = BenchConfig(batches=(1,), concurrency=(c,), active_vectors=(1,), duration=a.duration)
                        target = RemoteTarget(f"http://127.0.0.1:{port}", "m", "rest", a.client_processes)
                        for rec in run_remote_bench(target, one):
                            row(f"rest, {label}", rec)
                    else:
                        r = fn(a.wrk, a.bundle, port, c, a.duration)
                        out["rows"].append({"kind": "rest, wrk", "concurrency": c, **r})
                        print(json.dumps(out["rows"][-1]), flush=True)
        finally:
            proc.terminate()
            proc.wait(20)
    elif a.http_compare:
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
