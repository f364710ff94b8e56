"""Latency / throughput benchmarking of a bundle through the Runtime (``forgetrt bench``).

For every point of the grid batch × concurrency × active vectors: warm up, then run closed-loop clients
for ``duration`` seconds. Concurrency 1 calls ``Runtime.infer`` directly; higher concurrency runs that
many client threads through the dynamic batcher (``submit``) configured by the runtime's
:class:`~forgetrt.runtime.batcher.BatchingConfig`, so queue time and compute time are
reported separately. ``compare_bare`` also times the classifier alone (the fused graph cut after the
forget prefix) on onnxruntime in the same run. Every result carries the config, versions, machine and
device, so a JSON line is self-describing.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .errors import InvalidInputError, unknown
from .runtime import Runtime

__all__ = ["BenchConfig", "run_bench", "summarize", "plot_results", "MIXES", "latency_stats"]

MIXES = ("homogeneous", "heterogeneous")


@dataclass(frozen=True)
class BenchConfig:
    batches: tuple[int, ...] = (1, 8, 32)
    concurrency: tuple[int, ...] = (1,)
    active_vectors: tuple[int, ...] = (1,)
    mix: str = "heterogeneous"
    duration: float = 10.0
    warmup: float = 2.0
    compare_bare: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mix not in MIXES:
            raise unknown("mix", self.mix, MIXES)
        if not self.duration > 0:
            raise InvalidInputError(f"duration must be > 0 seconds, got {self.duration}")
        if self.warmup < 0:
            raise InvalidInputError(f"warm-up must be >= 0 seconds, got {self.warmup}")
        for name, vals in (("batch", self.batches), ("concurrency", self.concurrency)):
            if not vals or any(v < 1 for v in vals):
                raise InvalidInputError(f"{name} values must be >= 1, got {list(vals)}")
        if not self.active_vectors or any(v < 0 for v in self.active_vectors):
            raise InvalidInputError(f"active vector counts must be >= 0, got {list(self.active_vectors)}")


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    a = np.asarray(seconds, np.float64) * 1e3
    q = np.percentile(a, [50, 90, 95, 99])
    return {
        "min_ms": float(a.min()),
        "mean_ms": float(a.mean()),
        "p50_ms": float(q[0]),
        "p90_ms": float(q[1]),
        "p95_ms": float(q[2]),
        "p99_ms": float(q[3]),
        "max_ms": float(a.max()),
    }


def _environment(rt: Runtime) -> dict[str, Any]:
    import onnxruntime

    env = {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "onnxruntime": onnxruntime.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "backend": rt.backend_name,
        "device": rt.device,
        "device_name": "cpu",
    }
    try:
        from importlib.metadata import version

        env["forgetrt"] = version("forgetrt")
    except Exception:  # noqa: BLE001
        env["forgetrt"] = "unknown"
    if rt.device == "cuda" and "torch" in sys.modules:
        env["device_name"] = sys.modules["torch"].cuda.get_device_name(0)
    return env


def _requests(
    rt: Runtime, batch: int, active: int, mix: str, rng: np.random.Generator, n: int = 64
) -> list[tuple[np.ndarray, Any]]:
    k = rt.snapshot.k
    if active > k:
        raise InvalidInputError(f"{active} active vectors requested, the bundle has {k}")
    names = rt.snapshot.names
    out = []
    for _ in range(n):
        x = rng.random((batch, *rt.iospec.shape), dtype=np.float32)
        if active == 0:
            forget: Any = None
        elif mix == "homogeneous":
            forget = list(names[:active])
        else:
            forget = {
                names[j]: float(w) for j, w in zip(rng.choice(k, active, replace=False), rng.uniform(0.25, 1.0, active))
            }
            if rt.snapshot.coeff_range is not None:
                lo, hi = rt.snapshot.coeff_range
                forget = {n_: min(max(w, lo), hi) for n_, w in forget.items()}
        out.append((x, forget))
    return out


def _closed_loop(
    call: Callable[[np.ndarray, Any], Any], reqs: list, concurrency: int, seconds: float
) -> tuple[list[float], list[Any], float]:
    lat: list[float] = []
    res: list[Any] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(i: int) -> None:
        j = i
        mine_l, mine_r = [], []
        while time.perf_counter() < stop:
            x, f = reqs[j % len(reqs)]
            t = time.perf_counter()
            r = call(x, f)
            mine_l.append(time.perf_counter() - t)
            mine_r.append(r)
            j += concurrency
        with lock:
            lat.extend(mine_l)
            res.extend(mine_r)

    t0 = time.perf_counter()
    if concurrency == 1:
        client(0)
    else:
        ts = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    return lat, res, time.perf_counter() - t0


def _bare_session(rt: Runtime):
    """The classifier alone: the bundle's fused graph cut after the forget prefix, on onnxruntime."""
    import onnx
    import onnxruntime as ort
    from onnx.utils import Extractor

    if rt.backend_name != "onnxruntime":
        raise InvalidInputError(
            f"--compare-bare times the bare classifier on onnxruntime; this run uses {rt.backend_name}"
        )
    model = onnx.load(str(rt.bundle.onnx_path))
    bare = Extractor(model).extract_model(["forget_input"], [model.graph.output[0].name])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if rt.device == "cuda" else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(bare.SerializeToString(), so, providers=providers)
    return sess, sess.get_inputs()[0].name


def run_bench(rt: Runtime, cfg: BenchConfig, *, progress: bool = True) -> list[dict[str, Any]]:
    """Benchmark every grid point; returns one self-describing record per point."""
    from .logs import progress as _progress

    env = _environment(rt)
    rng = np.random.default_rng(cfg.seed)
    grid = [(b, c, a) for b in cfg.batches for c in cfg.concurrency for a in cfg.active_vectors]
    limit = rt.config.batching.max_batch_size
    over = sorted({b for b, _, _ in grid if b > limit})
    if over:
        raise InvalidInputError(
            f"batch sizes {over} exceed the runtime's maximum batch {limit} (the engine's limit, or --max-batch-size)"
        )
    bare = _bare_session(rt) if cfg.compare_bare else None
    records = []
    for b, c, a in _progress(iterable=grid, desc="bench", unit="point", disable=True if not progress else None):
        reqs = _requests(rt, b, a, cfg.mix, rng)
        call = (lambda x, f: rt.infer(x, f)) if c == 1 else (lambda x, f: rt.submit(x, f).result())
        if cfg.warmup:
            _closed_loop(call, reqs, c, cfg.warmup)
        lat, res, elapsed = _closed_loop(call, reqs, c, cfg.duration)
        rec: dict[str, Any] = {
            "point": {
                "batch": b,
                "concurrency": c,
                "active_vectors": a,
                "mix": cfg.mix,
                "path": "direct" if c == 1 else "batcher",
            },
            # what ran: the bench grid, the runtime's own config (batching included) and the backend as built
            "config": {
                **asdict(cfg),
                "runtime": rt.config.to_dict(),
                "backend": rt.backends[0].describe(),
                "bundle": str(rt.bundle.path),
                "bundle_id": rt.bundle.bundle_id,
            },
            "env": env,
            "requests": len(lat),
            "seconds": elapsed,
            "latency": latency_stats(lat),
            "throughput": {"images_per_s": len(lat) * b / elapsed, "requests_per_s": len(lat) / elapsed},
            "queue_us": {
                "mean": float(np.mean([r.queue_us for r in res])),
                "p50": float(np.percentile([r.queue_us for r in res], 50)),
            },
            "compute_us": {
                "mean": float(np.mean([r.compute_us for r in res])),
                "p50": float(np.percentile([r.compute_us for r in res], 50)),
            },
            "engine_batch_images_mean": float(np.mean([r.batch_images for r in res])),
        }
        if bare is not None and c == 1:  # the bare classifier is timed as one serial client, like the direct path
            sess, name = bare
            xs = [x for x, _ in reqs]
            run_bare = lambda x, f: sess.run(None, {name: x})  # noqa: E731
            if cfg.warmup:
                _closed_loop(run_bare, list(zip(xs, [None] * len(xs))), 1, min(cfg.warmup, 1.0))
            blat, _, bel = _closed_loop(run_bare, list(zip(xs, [None] * len(xs))), 1, cfg.duration)
            rec["bare"] = {"latency": latency_stats(blat), "images_per_s": len(blat) * b / bel}
            rec["bare"]["overhead_p50_pct"] = 100 * (rec["latency"]["p50_ms"] / rec["bare"]["latency"]["p50_ms"] - 1)
        records.append(rec)
    return records


def summarize(records: list[dict[str, Any]]) -> str:
    """A table in the spirit of trtexec / perf_analyzer summaries."""
    if not records:
        return "no points"
    env = records[0]["env"]
    lines = [
        f"=== forgetrt bench: {records[0]['config']['bundle']}  backend {env['backend']} on {env['device']} "
        f"({env['device_name']}), "
        f"onnxruntime {env['onnxruntime']}, {env['cpu_count']} CPUs ===",
        f"{'batch':>5} {'conc':>4} {'act':>3} {'path':>7} | {'min':>8} {'mean':>8} {'p50':>8} {'p90':>8} {'p95':>8} "
        f"{'p99':>8} {'max':>8} ms | "
        f"{'img/s':>9} {'req/s':>9} | {'queue':>8} {'compute':>8} us"
        + (" | bare p50 ms  overhead" if "bare" in records[0] else ""),
    ]
    for r in records:
        p, lat = r["point"], r["latency"]
        line = (
            f"{p['batch']:>5} {p['concurrency']:>4} {p['active_vectors']:>3} {p['path']:>7} | "
            + " ".join(
                f"{lat[k]:>8.3f}" for k in ("min_ms", "mean_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms")
            )
            + f" ms | {r['throughput']['images_per_s']:>9.1f} {r['throughput']['requests_per_s']:>9.1f} | "
            + f"{r['queue_us']['mean']:>8.1f} {r['compute_us']['mean']:>8.1f} us"
        )
        if "bare" in r:
            line += f" | {r['bare']['latency']['p50_ms']:>11.3f} {r['bare']['overhead_p50_pct']:>+8.1f}%"
        elif "bare" in records[0]:
            line += f" | {'-':>11} {'-':>9}"
        lines.append(line)
    return "\n".join(lines)


def write_jsonl(records: list[dict[str, Any]], path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def plot_results(records: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Latency (p50, p99) vs batch size and throughput vs concurrency, one line per other setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    by_c: dict[tuple, list] = {}
    for r in records:
        p = r["point"]
        by_c.setdefault((p["concurrency"], p["active_vectors"]), []).append(r)
    for (c, a), rs in sorted(by_c.items()):
        rs = sorted(rs, key=lambda r: r["point"]["batch"])
        bs = [r["point"]["batch"] for r in rs]
        ax1.plot(bs, [r["latency"]["p50_ms"] for r in rs], marker="o", label=f"p50, conc {c}, {a} active")
        ax1.plot(
            bs, [r["latency"]["p99_ms"] for r in rs], marker="x", linestyle="--", label=f"p99, conc {c}, {a} active"
        )
    ax1.set(
        xscale="log",
        yscale="log",
        xlabel="batch size (images per request)",
        ylabel="latency (ms)",
        title="latency vs batch",
    )
    batches = sorted({r["point"]["batch"] for r in records})
    ax1.set_xticks(batches, [str(b) for b in batches])
    ax1.minorticks_off()
    ax1.legend(fontsize=7)
    by_b: dict[tuple, list] = {}
    for r in records:
        p = r["point"]
        by_b.setdefault((p["batch"], p["active_vectors"]), []).append(r)
    for (b, a), rs in sorted(by_b.items()):
        rs = sorted(rs, key=lambda r: r["point"]["concurrency"])
        ax2.plot(
            [r["point"]["concurrency"] for r in rs],
            [r["throughput"]["images_per_s"] for r in rs],
            marker="o",
            label=f"batch {b}, {a} active",
        )
    ax2.set(xscale="log", xlabel="concurrent clients", ylabel="images / s", title="throughput vs concurrency")
    concs = sorted({r["point"]["concurrency"] for r in records})
    ax2.set_xticks(concs, [str(c) for c in concs])
    ax2.minorticks_off()
    ax2.legend(fontsize=7)
    env = records[0]["env"]
    fig.suptitle(f"forgetrt bench — {env['backend']} on {env['device']} ({env['device_name']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
