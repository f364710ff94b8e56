"""Ray Serve scale-out, measured: requests/s and latency through Ray's proxy with 1 and 2 replicas next to
`forgetrt serve` (one uvicorn process) in the same run; cluster-wide bank changes under load (time to the
acknowledgement, answers with an older bank after it); a replica killed under load (failed requests, time
until its replacement answers, the bank it serves).

    python benchmarks/ray_scaleout.py --bundle runs/bundle --bank runs/bank --json ray_scaleout.json

Needs the 'ray' extra. Clients are threads in this process (httpx, one connection each, JSON bodies of
one image): on a 2-core machine they share the cores with the servers, so the numbers compare
configurations in one run rather than measure a ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

TOKEN = "benchmark-admin-token-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _body(shape, seed: int, forget: str) -> dict:
    x = np.random.default_rng(seed).uniform(0, 1, (1, *shape)).astype(np.float32)
    return {
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [1, *shape], "data": x.ravel().tolist()}],
        "parameters": {"forget": forget},
    }


def closed_loop(url: str, model: str, shape, forget: str, clients: int, seconds: float, marks: list | None = None):
    """``clients`` threads, each sending one request after another for ``seconds``. Returns the summary and
    every (send time, status, bank version, instance) when ``marks`` is a list."""
    import httpx

    stop = threading.Event()
    lat: list[float] = []
    codes: dict[int, int] = {}
    lock = threading.Lock()
    bodies = [_body(shape, i, forget) for i in range(16)]

    def worker(k: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            i = 0
            while not stop.is_set():
                t = time.monotonic()
                try:
                    r = c.post(f"/v2/models/{model}/infer", json=bodies[(k + i) % len(bodies)])
                    code = r.status_code
                    ver = r.json().get("parameters", {}).get("bank_version") if code == 200 else None
                    inst = r.headers.get("x-forgetrt-instance")
                except httpx.HTTPError:
                    code, ver, inst = -1, None, None
                dt = time.monotonic() - t
                with lock:
                    codes[code] = codes.get(code, 0) + 1
                    if code == 200:
                        lat.append(dt)
                    if marks is not None:
                        marks.append((t, code, ver, inst))
                i += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    wall = time.monotonic() - t0
    a = np.array(lat) * 1e3 if lat else np.array([np.nan])
    return {
        "clients": clients,
        "seconds": round(wall, 2),
        "ok": len(lat),
        "requests_per_s": round(len(lat) / wall, 1),
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "status": codes,
    }


def _replicas(ray) -> list[dict]:
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA::forgetrt" in a["name"]]


def _wait_ready(url: str, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--bank", required=True, help="a bank for the hot swaps (copied under a temporary bank root)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--swaps", type=int, default=5)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import ray
    from ray import serve

    from forgetrt.runtime import RuntimeConfig
    from forgetrt.runtime.bundle import Bundle
    from forgetrt.runtime.deploy import ClusterConfig, ScaleConfig, deploy, shutdown

    b = Bundle.load(args.bundle)
    shape, model = tuple(b.iospec.shape), "m"
    forget = b.manifest.vectors[0]
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "ray": ray.__version__,
        "bundle": b.bundle_id,
        "clients": args.clients,
    }
    print(json.dumps(results["machine"]))

    # 1. one uvicorn process (forgetrt serve), same clients
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "forgetrt.tools.cli", "--log-level", "warning", "serve", args.bundle]
        + ["--port", str(port), "--device", "cpu", "--backend", "onnxruntime", "--model-name", model],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_ready(f"http://127.0.0.1:{port}")
        closed_loop(f"http://127.0.0.1:{port}", model, shape, forget, args.clients, 1.0)  # warm-up
        results["forgetrt_serve"] = closed_loop(
            f"http://127.0.0.1:{port}", model, shape, forget, args.clients, args.seconds
        )
        print("forgetrt serve", results["forgetrt_serve"])
    finally:
        proc.terminate()
        proc.wait(20)

    work = Path(tempfile.mkdtemp(prefix="ray-scaleout-"))
    root, state = work / "banks", work / "state"
    shutil.copytree(args.bank, root / "b")
    ray.init(include_dashboard=False, namespace="forgetrt", log_to_driver=False)
    try:
        for n in (1, 2):
            port = _free_port()
            t0 = time.monotonic()
            url = deploy(
                args.bundle,
                RuntimeConfig(backend="onnxruntime", device="cpu"),
                {"threads": 1},
                scale=ScaleConfig(replicas=n, cpus_per_replica=0.5),
                cluster=ClusterConfig(lease_s=2.0, poll_s=0.5),
                port=port,
                model_name=model,
                token=TOKEN,
                bank_root=str(root),
                state_dir=str(state),
            )
            results[f"deploy_s_{n}"] = round(time.monotonic() - t0, 2)
            closed_loop(url, model, shape, forget, args.clients, 1.0)
            results[f"ray_{n}_replicas"] = closed_loop(url, model, shape, forget, args.clients, args.seconds)
            print(f"ray {n} replica(s)", results[f"ray_{n}_replicas"])
            if n == 2:
                break
            shutdown()
            serve.shutdown()

        import httpx

        # 2. bank changes under load
        swaps = []
        for _ in range(args.swaps):
            marks: list = []
            out: dict = {}

            def change(out=out) -> None:
                time.sleep(0.5)
                t = time.monotonic()
                r = httpx.post(
                    f"{url}/v2/repository/models/{model}/load",
                    json={"parameters": {"bank": "b"}},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                    timeout=60,
                )
                out.update(t_ack=time.monotonic(), ack_ms=(time.monotonic() - t) * 1e3, resp=r.json())

            th = threading.Thread(target=change)
            th.start()
            closed_loop(url, model, shape, forget, args.clients, 2.0, marks)
            th.join()
            new = out["resp"]["bank_version"]
            after = [m for m in marks if m[0] > out["t_ack"]]
            swaps.append(
                {
                    "ack_ms": round(out["ack_ms"], 1),
                    "version": new,
                    "replicas_confirmed": out["resp"].get("replicas_confirmed"),
                    "answers_after_ack": len(after),
                    "older_bank_after_ack": sum(1 for m in after if m[1] == 200 and m[2] != new),
                    "failed": sum(1 for m in marks if m[1] != 200),
                }
            )
            print("swap", swaps[-1])
        results["swaps"] = swaps

        # 3. a replica killed under load
        replicas = [
            a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA::forgetrt" in a["name"]
        ]
        victim = replicas[0]
        marks = []

        def kill() -> None:
            time.sleep(1.0)
            marks.append(("kill", time.monotonic()))
            ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)

        threading.Thread(target=kill).start()
        summary = closed_loop(url, model, shape, forget, args.clients, 4.0, marks)
        t_kill = next(m[1] for m in marks if m[0] == "kill")
        answers = [m for m in marks if m[0] != "kill"]
        acked = swaps[-1]["version"] if swaps else 0
        t0 = time.monotonic()
        replaced = None
        while time.monotonic() - t0 < 120:
            live = [
                a["name"]
                for a in ray.util.list_named_actors(all_namespaces=True)
                if "SERVE_REPLICA::forgetrt" in a["name"]
            ]
            if len(live) == 2 and victim["name"] not in live:
                replaced = round(time.monotonic() - t_kill, 2)
                break
            time.sleep(0.1)
        results["kill"] = {
            "answers": len(answers),
            "failed": sum(1 for m in answers if m[1] != 200),
            "older_bank": sum(1 for m in answers if m[1] == 200 and m[2] != acked),
            "replacement_up_s": replaced,
            "load": summary,
        }
        print("kill", results["kill"])
    finally:
        try:
            shutdown()
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
