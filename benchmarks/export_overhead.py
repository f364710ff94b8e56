#!/usr/bin/env python
"""Cost of the fused forget-vector prefix on onnxruntime CPU: bare classifier vs fused graph, same run.

For each architecture it exports the bare classifier and the fused graph (K random vectors; latency
does not depend on the weights' values), creates one onnxruntime CPU session per graph with the same
options, and times them interleaved (alternating blocks of runs, so drift hits both equally) after a
warm-up. Reports p50/p90/p99 latency and the p50 overhead in percent, plus export times.

    python benchmarks/export_overhead.py --arch digits-cnn,resnet18-cifar --batch 1,32 --runs 300
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from forgetrt.export.onnx_graph import fuse_classifier
from forgetrt.export.torch_onnx import classifier_to_onnx
from forgetrt.runtime import IOSpec
from forgetrt.runtime.architectures import create_model, model_input_shape


def _session(data: bytes, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _pct(a: list[float]) -> dict[str, float]:
    x = np.asarray(a) * 1e3
    return {
        "p50_ms": float(np.percentile(x, 50)),
        "p90_ms": float(np.percentile(x, 90)),
        "p99_ms": float(np.percentile(x, 99)),
        "mean_ms": float(x.mean()),
        "n": len(x),
    }


def bench(arch: str, batches: list[int], runs: int, warmup: int, k: int, threads: int) -> dict:
    c, h, w = model_input_shape(arch)
    spec = IOSpec(shape=(c, h, w), mean=(0.5,) * c, std=(0.25,) * c, labels=tuple(str(i) for i in range(10)))
    torch.manual_seed(0)
    model = create_model(arch, spec).eval()
    t0 = time.perf_counter()
    clf = classifier_to_onnx(model, spec)
    t_clf = time.perf_counter() - t0
    bank = np.random.default_rng(0).normal(0, 0.05, (k, spec.numel)).astype(np.float32)
    t0 = time.perf_counter()
    fused = fuse_classifier(clf, spec, bank, vector_names=[f"v{i}" for i in range(k)])
    t_fuse = time.perf_counter() - t0
    bare_s, fused_s = _session(clf.SerializeToString(), threads), _session(fused.SerializeToString(), threads)
    out = {"arch": arch, "K": k, "export_classifier_s": t_clf, "fuse_s": t_fuse, "points": []}
    for n in batches:
        rng = np.random.default_rng(n)
        x = rng.random((n, c, h, w), dtype=np.float32)
        coeffs = rng.uniform(-1, 1, (n, k)).astype(np.float32)  # every row a different composition
        feeds = {"bare": {"classifier_input": x}, "fused": {"image": x, "coeffs": coeffs}}
        sess = {"bare": bare_s, "fused": fused_s}
        for name in sess:
            for _ in range(warmup):
                sess[name].run(None, feeds[name])
        times: dict[str, list[float]] = {"bare": [], "fused": []}
        block = 10
        for i in range(0, runs, block):
            order = ("bare", "fused") if (i // block) % 2 == 0 else ("fused", "bare")
            for name in order:
                for _ in range(block):
                    t = time.perf_counter()
                    sess[name].run(None, feeds[name])
                    times[name].append(time.perf_counter() - t)
        b, f = _pct(times["bare"]), _pct(times["fused"])
        out["points"].append(
            {"batch": n, "bare": b, "fused": f, "overhead_p50_pct": 100 * (f["p50_ms"] / b["p50_ms"] - 1)}
        )
        print(
            f"{arch:<15} batch {n:>3}: bare p50 {b['p50_ms']:8.3f} ms  fused p50 {f['p50_ms']:8.3f} ms  overhead "
            f"{out['points'][-1]['overhead_p50_pct']:+.2f}%",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="digits-cnn,resnet18-cifar")
    p.add_argument("--batch", default="1,32")
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--k", type=int, default=10, help="selectable vectors in the fused graph")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", default=None, help="write results here")
    a = p.parse_args(argv)
    env = {
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": a.threads,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    results = {
        "env": env,
        "config": vars(a),
        "archs": [
            bench(arch, [int(b) for b in a.batch.split(",")], a.runs, a.warmup, a.k, a.threads)
            for arch in a.arch.split(",")
        ],
    }
    for r in results["archs"]:
        print(f"{r['arch']}: classifier export {r['export_classifier_s']:.2f}s, prefix graft {r['fuse_s']:.3f}s")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
