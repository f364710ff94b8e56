#!/usr/bin/env python
"""Runtime overheads on onnxruntime CPU, each against its baseline in the same run.

(a) ``Runtime.infer`` p50 at batch 1 vs a bare ``InferenceSession.run`` on the same fused graph;
(b) a batch of 64 whose rows all have different compositions vs a batch of 64 with one composition;
(c) 32 concurrent closed-loop submitters through the dynamic batcher (threads with ``submit`` and
    asyncio tasks with ``infer_async``) vs serial batch-1 ``Runtime.infer``; the batcher is sized for
    the load (``--c-max-batch 32 --c-delay-us 0``) and the rates are medians of interleaved rounds.

Bundles are built on the fly from freshly initialised models (latency does not depend on the weights'
values) with K random vectors: ``digits-cnn`` (1×8×8) and ``resnet18-cifar`` (3×32×32).

    python benchmarks/runtime_overhead.py --arch digits-cnn,resnet18-cifar --json runs/runtime_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from forgetrt.runtime import BatchingConfig, IOSpec, Runtime, RuntimeConfig, VectorBank


def make_bundle(arch: str, k: int, root: Path) -> Path:
    import torch

    from forgetrt.export.onnx_export import export_onnx
    from forgetrt.runtime.architectures import create_model, model_input_shape
    from forgetrt.runtime.model_folder import model_fingerprint, save_model

    c, h, w = model_input_shape(arch)
    spec = IOSpec(shape=(c, h, w), mean=(0.5,) * c, std=(0.25,) * c, labels=tuple(str(i) for i in range(10)))
    torch.manual_seed(0)
    model = create_model(arch, spec).eval()
    save_model(root / f"{arch}-model", model, arch=arch, iospec=spec)
    bank = VectorBank.create(model_fingerprint(model), arch, spec)
    rng = np.random.default_rng(0)
    for i in range(k):
        bank.add(
            f"v{i}",
            rng.normal(0, 0.05, spec.shape).astype(np.float32),
            forgets={"kind": "class", "classes": [i % 10]},
            recipe={},
        )
    bank.save(root / f"{arch}-bank")
    out = root / f"{arch}-bundle"
    export_onnx(root / f"{arch}-bank", out, model_dir=root / f"{arch}-model", overwrite=True)
    return out


def pct(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1e3
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "n": len(a),
    }


def interleaved(fns: dict, runs: int, warmup: int, block: int = 10) -> dict[str, list[float]]:
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(0, runs, block):
        order = names if (i // block) % 2 == 0 else names[::-1]
        for name in order:
            f = fns[name]
            for _ in range(block):
                t = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t)
    return times


def bench(
    arch: str,
    bundle: Path,
    runs: int,
    warmup: int,
    seconds: float,
    threads: int,
    c_batch: int = 32,
    c_delay_us: int = 0,
    c_rounds: int = 3,
) -> dict:
    rt = Runtime.load(
        bundle,
        RuntimeConfig(
            backend="onnxruntime",
            device="cpu",
            batching=BatchingConfig(max_batch_size=64, max_queue_delay_us=200, max_queue=4096),
        ),
    )
    spec, k = rt.iospec, rt.snapshot.k
    rng = np.random.default_rng(0)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    bare = ort.InferenceSession(str(bundle / "model.onnx"), so, providers=["CPUExecutionProvider"])
    x1 = rng.random((1, *spec.shape), dtype=np.float32)
    c1 = np.zeros((1, k), np.float32)
    c1[0, 1] = 1.0
    res: dict = {"arch": arch, "K": k}

    # (a) per-call overhead at batch 1
    t = interleaved(
        {"bare": lambda: bare.run(None, {"image": x1, "coeffs": c1}), "runtime": lambda: rt.infer(x1, ["v1"])},
        runs,
        warmup,
    )
    a = {"bare": pct(t["bare"]), "runtime": pct(t["runtime"])}
    a["overhead_pct"] = 100 * (a["runtime"]["p50_ms"] / a["bare"]["p50_ms"] - 1)
    res["a_infer_vs_bare_batch1"] = a

    # (b) heterogeneous vs homogeneous batch of 64
    x64 = rng.random((64, *spec.shape), dtype=np.float32)
    hetero = rng.uniform(-1, 1, (64, k)).astype(np.float32)
    homo = np.tile(hetero[0], (64, 1))
    t = interleaved(
        {"homogeneous": lambda: rt.infer(x64, coeffs=homo), "heterogeneous": lambda: rt.infer(x64, coeffs=hetero)},
        max(20, runs // 5),
        max(3, warmup // 5),
    )
    b = {m: pct(v) for m, v in t.items()}
    for m in b:
        b[m]["images_per_s"] = 64 / (b[m]["p50_ms"] / 1e3)
    b["ratio"] = b["heterogeneous"]["images_per_s"] / b["homogeneous"]["images_per_s"]
    res["b_hetero_vs_homo_batch64"] = b

    # (c) concurrent submitters through the batcher vs serial batch-1 calls
    names = [f"v{i}" for i in range(k)]

    def serial_rate() -> float:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            rt.infer(x1, [names[n % k]])
            n += 1
        return n / (time.perf_counter() - t0)

    def concurrent_rate() -> tuple[float, float]:
        stop = threading.Event()
        counts = [0] * threads
        batch_sizes: list[int] = []

        def worker(i: int) -> None:
            j = 0
            while not stop.is_set():
                r = rt.submit(x1, [names[(i + j) % k]]).result()
                j += 1
                counts[i] += 1
                if i == 0:
                    batch_sizes.append(r.batch_images)

        ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        t0 = time.perf_counter()
        for th in ts:
            th.start()
        time.sleep(seconds)
        stop.set()
        for th in ts:
            th.join()
        return sum(counts) / (time.perf_counter() - t0), float(np.mean(batch_sizes)) if batch_sizes else 0.0

    def async_rate() -> tuple[float, float]:
        import asyncio

        async def run() -> tuple[float, float]:
            counts = [0] * threads
            sizes: list[int] = []
            t_end = time.perf_counter() + seconds

            async def task(i: int) -> None:
                j = 0
                while time.perf_counter() < t_end:
                    r = await rt.infer_async(x1, [names[(i + j) % k]])
                    j += 1
                    counts[i] += 1
                    if i == 0:
                        sizes.append(r.batch_images)

            t0 = time.perf_counter()
            await asyncio.gather(*(task(i) for i in range(threads)))
            return sum(counts) / (time.perf_counter() - t0), float(np.mean(sizes)) if sizes else 0.0

        return asyncio.run(run())

    # (c) runs on its own runtime, its batcher sized for the load; serial and concurrent rates are
    # measured in interleaved rounds (medians), since this machine's speed drifts between seconds
    rt_c = Runtime.load(
        bundle,
        RuntimeConfig(
            backend="onnxruntime",
            device="cpu",
            batching=BatchingConfig(max_batch_size=c_batch, max_queue_delay_us=c_delay_us, max_queue=4096),
        ),
    )
    rt_serial, rt = rt, rt_c
    serial_rate()  # warm-up
    rounds: dict[str, list] = {"serial": [], "threads": [], "async": []}
    for _ in range(c_rounds):
        rt = rt_serial
        rounds["serial"].append(serial_rate())
        rt = rt_c
        rounds["threads"].append(concurrent_rate())
        rounds["async"].append(async_rate())
    rt_c.close()
    rt = rt_serial
    s = float(np.median(rounds["serial"]))
    conc, mean_batch = (float(np.median([r[i] for r in rounds["threads"]])) for i in (0, 1))
    aconc, amean = (float(np.median([r[i] for r in rounds["async"]])) for i in (0, 1))
    res["c_concurrent_vs_serial"] = {
        "serial_req_per_s": s,
        "threads": threads,
        "thread_submitters_req_per_s": conc,
        "thread_speedup": conc / s,
        "thread_mean_batch_images": mean_batch,
        "async_submitters_req_per_s": aconc,
        "async_speedup": aconc / s,
        "async_mean_batch_images": amean,
        "rounds": c_rounds,
        "round_seconds": seconds,
        "batcher": {"max_batch_size": c_batch, "max_queue_delay_us": c_delay_us},
        "per_round": rounds,
    }
    rt.close()
    print(
        f"{arch:<15} (a) batch-1 p50: bare {a['bare']['p50_ms']:.4f} ms, Runtime.infer {a['runtime']['p50_ms']:.4f} ms "
        f"({a['overhead_pct']:+.1f}%)"
    )
    print(
        f"{'':<15} (b) batch 64: homogeneous {b['homogeneous']['images_per_s']:.0f} img/s, heterogeneous "
        f"{b['heterogeneous']['images_per_s']:.0f} img/s (ratio {b['ratio']:.3f})"
    )
    print(
        f"{'':<15} (c) serial batch-1 {s:.0f} req/s; {threads} submitter threads {conc:.0f} req/s ({conc / s:.2f}x, "
        f"mean batch {mean_batch:.1f}); "
        f"{threads} asyncio tasks {aconc:.0f} req/s ({aconc / s:.2f}x, mean batch {amean:.1f})",
        flush=True,
    )
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="digits-cnn,resnet18-cifar")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--runs", type=int, default=500)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument(
        "--seconds", type=float, default=2.0, help="duration of each throughput measurement in (c), per round"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved rounds of serial / threads / asyncio in (c); medians are reported",
    )
    p.add_argument("--c-max-batch", type=int, default=32, help="(c): the batcher's max_batch_size")
    p.add_argument("--c-delay-us", type=int, default=0, help="(c): the batcher's max_queue_delay_us")
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    env = {
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    out = {"env": env, "config": vars(a), "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in a.arch.split(","):
            out["results"].append(
                bench(
                    arch,
                    make_bundle(arch, a.k, Path(tmp)),
                    a.runs,
                    a.warmup,
                    a.seconds,
                    a.threads,
                    a.c_max_batch,
                    a.c_delay_us,
                    a.rounds,
                )
            )
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
