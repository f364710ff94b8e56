#!/usr/bin/env python
"""Latency of a bundle on the GPU, in one run: torch eager vs CUDA-graph replay (issue bar: graphs at
least 5x faster at batch 1 for resnet18-cifar), onnxruntime's CUDA EP where installed, and the KServe
server's end-to-end p50 over loopback HTTP. Everything goes through ``Runtime.infer`` (validation,
composition, copies in and out included); the bare module is timed beside it for reference.

    python benchmarks/gpu_latency.py --bundle runs/cifar/bundle --json $OUT/gpu_latency.json
    python benchmarks/gpu_latency.py --synthetic resnet18-cifar --json $OUT/gpu_latency.json

Modes (each a Runtime on the torch backend): "torch eager (as trained)" runs the module as trained
(``fuse="none"``), the baseline; "torch eager" the backend's rewritten module (BatchNorm and Normalize
folded, cuDNN conv+ReLU fusion: ``fuse="auto"``); "torch cuda graphs (as trained)" captures the module as
trained, "torch cuda graphs (bn)" with BatchNorm folded only, "torch cuda graphs" the rewritten one, also at
each of ``--precisions`` beside fp32 (TF32 convolutions, PyTorch's default). Speed-ups are reported against
both eager modes, with each mode's largest deviation from the first mode's logits. The bare module as
trained (plain NCHW PyTorch, no runtime) is timed too.

``--synthetic ARCH`` builds a bundle with randomly initialised weights and 16 random vectors (latency
does not depend on the values). On a machine without CUDA it runs the eager CPU path only (a smoke run).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from forgetrt.runtime import BatchingConfig, Runtime, RuntimeConfig
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


def _client(url: str):
    """tritonclient.http where installed (the standard KServe v2 client), else httpx with the same binary protocol."""
    try:
        import tritonclient.http as httpclient
    except ImportError:
        httpclient = None
    if httpclient is not None:
        c = httpclient.InferenceServerClient(url)

        def call(x: np.ndarray, image: str, output: str, params: dict) -> np.ndarray:
            inp = httpclient.InferInput(image, list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            res = c.infer(
                "model", [inp], parameters=params, outputs=[httpclient.InferRequestedOutput(output, binary_data=True)]
            )
            return res.as_numpy(output)

        return "tritonclient.http", call
    import httpx

    s = httpx.Client(base_url=f"http://{url}")

    def call(x: np.ndarray, image: str, output: str, params: dict) -> np.ndarray:
        head = json.dumps(
            {
                "inputs": [
                    {
                        "name": image,
                        "shape": list(x.shape),
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes},
                    }
                ],
                "outputs": [{"name": output, "parameters": {"binary_data": True}}],
                "parameters": params,
            }
        ).encode()
        r = s.post(
            "/v2/models/model/infer",
            content=head + x.tobytes(),
            headers={"Inference-Header-Content-Length": str(len(head))},
        )
        r.raise_for_status()
        n = int(r.headers["Inference-Header-Content-Length"])
        return np.frombuffer(r.content[n:], np.float32)

    return "httpx", call


def server_latency(bundle: str, device: str, runs: int, warmup: int, **backend_options) -> dict:
    import uvicorn

    from forgetrt.runtime.server import ServerMetrics, create_app

    m = ServerMetrics()
    rt = Runtime.load(
        bundle,
        RuntimeConfig(backend="torch", device=device, batching=BatchingConfig(max_queue_delay_us=0)),
        backend_options,
        observer=m.observe_batch,
    )
    srv = uvicorn.Server(
        uvicorn.Config(create_app(rt, "model", metrics=m), host="127.0.0.1", port=0, log_level="warning")
    )
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.02)
    url = f"127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"
    client, call = _client(url)
    x = np.random.default_rng(0).random((1, *rt.iospec.shape), dtype=np.float32)
    params = {"forget": {rt.snapshot.names[0]: 1.0}}
    want = rt.infer(x, params["forget"]).logits.ravel()
    got = call(x, rt.iospec.image_name, rt.iospec.output_name, params).ravel()
    if not np.allclose(got, want, atol=1e-4 * max(1.0, float(np.abs(want).max()))):
        raise RuntimeError(f"server answer differs from Runtime.infer: {got[:4]} vs {want[:4]}")
    stats = timed(lambda: call(x, rt.iospec.image_name, rt.iospec.output_name, params), runs, warmup)
    stats["client"] = client
    srv.should_exit = True
    th.join(10)
    rt.close()
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle")
    src.add_argument("--synthetic", metavar="ARCH", help="random-weight bundle of this architecture")
    p.add_argument("--batches", default="1,8,64", help="batch sizes for eager vs graphs")
    p.add_argument(
        "--precisions", default="fp32,bf16,fp16", help="CUDA-graph precisions to time beside fp32 eager (CUDA only)"
    )
    p.add_argument("--runs", type=int, default=500)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--no-server", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import torch

    tmp = None
    bundle = a.bundle
    if a.synthetic:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from runtime_overhead import make_bundle

        tmp = tempfile.TemporaryDirectory()
        bundle = str(make_bundle(a.synthetic, 16, Path(tmp.name)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res: dict = {
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "bundle": a.bundle or f"synthetic {a.synthetic} (random weights, 16 vectors)",
        "runs": a.runs,
        "warmup": a.warmup,
        "tf32_convolutions": bool(torch.backends.cudnn.allow_tf32),
        "points": [],
    }
    rng = np.random.default_rng(0)
    modes = [
        ("torch eager (as trained)", {"cuda_graphs": False, "fuse": "none"}),
        ("torch eager", {"cuda_graphs": False}),
    ]
    if device == "cuda":
        modes += [
            ("torch cuda graphs (as trained)", {"cuda_graphs": True, "fuse": "none"}),
            ("torch cuda graphs (bn)", {"cuda_graphs": True, "fuse": "bn"}),
        ]
        for prec in a.precisions.split(","):
            modes.append(
                ("torch cuda graphs" + ("" if prec == "fp32" else f" {prec}"), {"cuda_graphs": True, "precision": prec})
            )
    runtimes = {}
    for name, opt in modes:
        try:
            runtimes[name] = Runtime.load(
                bundle, RuntimeConfig(backend="torch", device=device, batching=BatchingConfig(max_batch_size=256)), opt
            )
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            res.setdefault("unavailable", {})[name] = f"{type(e).__name__}: {e}"
            print(f"{name}: unavailable: {res['unavailable'][name]}", flush=True)
    res["backends"] = {name: rt.describe()["backend"] for name, rt in runtimes.items()}
    try:
        names = next(iter(runtimes.values())).snapshot.names
        shape = next(iter(runtimes.values())).iospec.shape
        for b in (int(s) for s in a.batches.split(",")):
            x = rng.random((b, *shape), dtype=np.float32)
            f = [names[0]]
            ref = None
            for name, rt in runtimes.items():
                st = timed(lambda rt=rt: rt.infer(x, f), a.runs, a.warmup)
                out = rt.infer(x, f).logits
                ref = out if ref is None else ref
                st["max_abs_diff_vs_eager"] = float(np.abs(out - ref).max())
                st["rel_diff_vs_eager"] = st["max_abs_diff_vs_eager"] / max(1e-12, float(np.abs(ref).max()))
                res["points"].append({"mode": name, "batch": b, **st})
                print(
                    f"{name:<34} batch {b:>3}: p50 {st['p50_ms']:.3f} ms  p99 {st['p99_ms']:.3f} ms  rel diff "
                    f"{st['rel_diff_vs_eager']:.1e}",
                    flush=True,
                )
        if device == "cuda":  # the bare module as trained (no runtime, plain NCHW): a user's PyTorch baseline
            from forgetrt.runtime.bundle import Bundle

            plain = Bundle.load(bundle).load_classifier("cuda")
            xt = torch.from_numpy(rng.random((1, *shape), dtype=np.float32)).cuda()

            def bare():
                with torch.inference_mode():
                    plain(xt)
                torch.cuda.synchronize()

            res["bare_module_eager_b1"] = timed(bare, a.runs, a.warmup)
            print(
                f"{'bare module eager (as trained)':<34} batch   1: p50 {res['bare_module_eager_b1']['p50_ms']:.3f} ms",
                flush=True,
            )
            del plain
            res["bare_replay_b1"] = {}
            for name, rt in runtimes.items():  # graph replay + synchronize alone: the floor under Runtime.infer
                g = getattr(rt.backends[0], "_graphs", {}).get(1)
                if g is not None:

                    def replay(g=g):
                        g.graph.replay()
                        torch.cuda.synchronize()

                    res["bare_replay_b1"][name] = timed(replay, a.runs, a.warmup)
                    print(
                        f"{'bare replay: ' + name:<34} batch   1: p50 {res['bare_replay_b1'][name]['p50_ms']:.3f} ms",
                        flush=True,
                    )
    finally:
        for rt in runtimes.values():
            rt.close()
    p50 = {(pt["mode"], pt["batch"]): pt["p50_ms"] for pt in res["points"]}
    if device == "cuda":
        res["speedup_p50_vs_eager_as_trained"] = {
            f"{m} b{b}": p50[("torch eager (as trained)", b)] / v
            for (m, b), v in p50.items()
            if m != "torch eager (as trained)"
        }
        res["speedup_p50_vs_eager_rewritten"] = {
            f"{m} b{b}": p50[("torch eager", b)] / v
            for (m, b), v in p50.items()
            if m.startswith("torch cuda graphs") and ("torch eager", b) in p50
        }
        try:
            with Runtime.load(bundle, RuntimeConfig(backend="onnxruntime", device="cuda")) as ortc:
                x = rng.random((1, *shape), dtype=np.float32)
                res["onnxruntime_cuda_b1"] = timed(lambda: ortc.infer(x, [names[0]]), a.runs, a.warmup)
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            res["onnxruntime_cuda_b1"] = {"unavailable": f"{type(e).__name__}: {e}"}
    if not a.no_server:
        opts = {"cuda_graphs": True} if device == "cuda" else {}
        try:
            res["server_end_to_end_b1"] = server_latency(bundle, device, max(100, a.runs // 2), a.warmup, **opts)
            s = res["server_end_to_end_b1"]
            print(
                f"server end to end  batch   1: p50 {s['p50_ms']:.3f} ms  p99 {s['p99_ms']:.3f} ms ({s['client']})",
                flush=True,
            )
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            res["server_end_to_end_b1"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"server end to end: {res['server_end_to_end_b1']['error']}", flush=True)
    for key in ("speedup_p50_vs_eager_as_trained", "speedup_p50_vs_eager_rewritten"):
        if key in res:
            print(
                f"{key} on {res['device_name']}: " + ", ".join(f"{k}: {v:.2f}x" for k, v in res[key].items()),
                flush=True,
            )
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
