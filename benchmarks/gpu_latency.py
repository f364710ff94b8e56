#!/usr/bin/env python
"""Batch-1 latency of a bundle on the torch backend: eager vs CUDA-graph replay, in the same run, plus
onnxruntime (CUDA EP where installed) and the KServe server's end-to-end p50 over loopback HTTP.

    python benchmarks/gpu_latency.py --bundle runs/cifar/bundle --json $OUT/gpu_latency.json

On a machine without CUDA it runs the eager CPU path only (a smoke run; no GPU numbers).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

from forgetrt.runtime import Runtime
from forgetrt.runtime.bench import latency_stats


def timed(fn, runs: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    lat = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t)
    return latency_stats(lat)


def server_p50(bundle: str, device: str, runs: int, warmup: int) -> dict:
    import tritonclient.http as httpclient
    import uvicorn

    from forgetrt.runtime.server import ServerMetrics, create_app

    m = ServerMetrics()
    backend = "torch"
    rt = Runtime.load(bundle, backend=backend, device=device, observer=m.observe_batch, max_queue_delay_us=0)
    srv = uvicorn.Server(uvicorn.Config(create_app(rt, "model", metrics=m), host="127.0.0.1", port=0, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.02)
    url = f"127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"
    c = httpclient.InferenceServerClient(url)
    x = np.random.default_rng(0).random((1, *rt.iospec.shape), dtype=np.float32)
    inp = httpclient.InferInput(rt.iospec.image_name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    out = [httpclient.InferRequestedOutput(rt.iospec.output_name, binary_data=True)]
    params = {"forget": [rt.bank.names[0]]}
    stats = timed(lambda: c.infer("model", [inp], parameters=params, outputs=out), runs, warmup)
    srv.should_exit = True
    th.join(10)
    rt.close()
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True)
    p.add_argument("--runs", type=int, default=500)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = np.random.default_rng(0).random((1, *Runtime.load(a.bundle, backend="onnxruntime", device="cpu").iospec.shape), dtype=np.float32)
    res: dict = {"device": device, "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d %H:%M"), "bundle": a.bundle}
    with Runtime.load(a.bundle, backend="torch", device=device, cuda_graphs=False) as eager:
        f = [eager.bank.names[0]]
        res["torch_eager"] = timed(lambda: eager.infer(x, f), a.runs, a.warmup)
    if device == "cuda":
        with Runtime.load(a.bundle, backend="torch", device="cuda", cuda_graphs=True) as graphs:
            res["torch_cuda_graphs"] = timed(lambda: graphs.infer(x, f), a.runs, a.warmup)
        res["graphs_speedup_p50"] = res["torch_eager"]["p50_ms"] / res["torch_cuda_graphs"]["p50_ms"]
        try:
            with Runtime.load(a.bundle, backend="onnxruntime", device="cuda") as ortc:
                res["onnxruntime_cuda"] = timed(lambda: ortc.infer(x, f), a.runs, a.warmup)
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            res["onnxruntime_cuda"] = {"unavailable": str(e)}
    res["server_end_to_end"] = server_p50(a.bundle, device, max(100, a.runs // 2), a.warmup)
    for k in ("torch_eager", "torch_cuda_graphs", "onnxruntime_cuda", "server_end_to_end"):
        if k in res and "p50_ms" in res[k]:
            print(f"{k:<20} p50 {res[k]['p50_ms']:.3f} ms  p99 {res[k]['p99_ms']:.3f} ms")
    if "graphs_speedup_p50" in res:
        print(f"CUDA graphs vs eager: {res['graphs_speedup_p50']:.2f}x at batch 1 ({res['device_name']})")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
