"""How many requests/s one engine process takes from front ends (`serve --workers N`), and what each costs
it in CPU, with no HTTP in the way: spawned processes play front ends (a RemoteService each, batch-1
requests naming one vector, ``--outstanding`` in flight per process) against this process's runtime
behind an EngineHub, over the same Unix socket pairs the server uses.

    python benchmarks/engine_hub.py --bundle forgetrt-demo/bundle --outstanding 1,64 --json hub.json

The engine's CPU per request (user + system, all its threads, from getrusage) bounds what one engine
process can serve on a host with cores to spare for the front ends: about 1e6 / (µs per request).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import resource
import socket
import time

import numpy as np

from forgetrt.runtime import BatchingConfig, Runtime, RuntimeConfig


def _front_end(bundle: str, sock: socket.socket, outstanding: int, duration: float, q) -> None:
    import uvloop

    from forgetrt.runtime.bundle import Bundle
    from forgetrt.runtime.frontends import RemoteService
    from forgetrt.runtime.service import InferCall, RequestParameters

    b = Bundle.load(bundle)
    svc = RemoteService(b.iospec, "m")
    x = np.random.default_rng(0).uniform(0, 1, (1, *b.iospec.shape)).astype(np.float32)
    call = InferCall(x, None, RequestParameters(forget=[b.manifest.vectors[0]]))

    async def main() -> None:
        await svc.connect(sock)
        for _ in range(200):  # warm-up
            await svc.infer(call)
        lat: list[float] = []
        stop = time.perf_counter() + duration

        async def one() -> None:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                await svc.infer(call)
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(outstanding)))
        q.put((len(lat), time.perf_counter() - t0, lat))

    uvloop.run(main())


def run(bundle: str, clients: int, outstanding: int, duration: float) -> dict:
    import uvloop

    from forgetrt.runtime.frontends import EngineHub
    from forgetrt.runtime.server import ServerMetrics
    from forgetrt.runtime.service import ModelService

    ctx = multiprocessing.get_context("spawn")
    metrics = ServerMetrics()
    config = RuntimeConfig(backend="onnxruntime", device="cpu", batching=BatchingConfig(max_batch_size=64))
    with Runtime.load(bundle, config, {"threads": 1}, observer=metrics.observe_batch) as rt:
        svc = ModelService(rt, "m", metrics=metrics)
        q = ctx.Queue()
        procs, ends = [], []
        for _ in range(clients):
            ours, theirs = socket.socketpair()
            p = ctx.Process(target=_front_end, args=(bundle, theirs, outstanding, duration, q))
            p.start()
            theirs.close()
            procs.append(p)
            ends.append(ours)

        results: list = []

        async def engine() -> None:
            hub = EngineHub(svc, metrics)
            for s in ends:
                await hub.attach(s)
            # read the results while they come: a process cannot exit before its queue is drained
            while len(results) < len(procs):
                results.append(await asyncio.to_thread(q.get, True, duration + 120))

        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        uvloop.run(engine())
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        for p in procs:
            p.join(30)
    n = sum(r[0] for r in results)
    lat = np.concatenate([np.asarray(r[2]) for r in results]) * 1e3
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    return {
        "clients": clients,
        "outstanding_per_client": outstanding,
        "requests_per_s": round(n / max(r[1] for r in results), 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 3),
        "p99_ms": round(float(np.percentile(lat, 99)), 3),
        # the engine's CPU over the whole run (warm-ups and start included) per measured request: an upper bound
        "engine_cpu_us_per_request": round(1e6 * cpu / max(n, 1), 1),
        "engine_wall_s": round(wall, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--clients", type=int, default=1, help="front-end processes")
    ap.add_argument("--outstanding", default="1,64", help="requests in flight per front end (comma-separated)")
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--json")
    a = ap.parse_args()
    out = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "rows": []}
    for k in (int(v) for v in a.outstanding.split(",")):
        row = run(a.bundle, a.clients, k, a.duration)
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
