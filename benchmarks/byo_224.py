#!/usr/bin/env python
"""Issue 15 at ImageNet resolution, in one run: a torchvision/timm classifier (random weights: timings do
not depend on them) at 224x224, where a forget vector has 150,528 values.

- vector training throughput (images/s through the frozen model, forward and backward, bf16 on CUDA) for
  1 and 10 vectors trained together;
- batch-1 and batch-32 latency through ``Runtime.infer`` with bundles of K = 1, 10, 100 vectors (one named
  per request), on the torch backend (CUDA graphs on a GPU, eager on a CPU) and on onnxruntime (its CUDA
  execution provider where installed, else the CPU one, as labelled), beside the bare classifier without
  the fused prefix;
- the bank as one contiguous block at K = 1,000: its bytes, the upload and one composition (coefficients
  [32, K] @ bank [K, C*H*W]) on the device.

    python benchmarks/byo_224.py --arch torchvision:resnet50 --json $OUT/byo_224.json             # a GPU
    python benchmarks/byo_224.py --arch cifar-small --size 32 --ks 1,4 --runs 20 --train-images 64  # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def timed(fn, runs: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    a = np.asarray(ts) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="torchvision:resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--ks", default="1,10,100")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--train-images", type=int, default=2048, help="synthetic images for the training throughput")
    p.add_argument("--bank-k", type=int, default=1000)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    import torch

    from forgetrt.export.onnx_export import export_onnx
    from forgetrt.runtime import BatchingConfig, Runtime, RuntimeConfig
    from forgetrt.runtime.architectures import create_model
    from forgetrt.runtime.bank import VectorBank
    from forgetrt.runtime.iospec import IOSpec
    from forgetrt.runtime.model_folder import model_fingerprint, save_model
    from forgetrt.train.data import Dataset, ForgetSpec
    from forgetrt.train.recipes import VectorRecipe
    from forgetrt.train.vectors import train_vectors

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    out: dict = {
        "arch": a.arch,
        "input": [3, a.size, a.size],
        "vector_values": 3 * a.size * a.size,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "latency": [],
    }

    def save() -> None:
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=1))

    def say(s: str) -> None:
        print(s, flush=True)

    spec = IOSpec(
        shape=(3, a.size, a.size),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        labels=tuple(f"c{i}" for i in range(a.classes)),
    )
    torch.manual_seed(0)
    model = create_model(a.arch, spec).eval()
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    save_model(root / "model", model, arch=a.arch, iospec=spec)
    rng = np.random.default_rng(0)

    # 1. vector training throughput
    n = a.train_images
    y = np.arange(n) % a.classes
    x = rng.integers(0, 256, (n, *spec.shape), dtype=np.uint8)
    ds = Dataset("synthetic", x, y, x[:8], y[:8], spec.labels, 255.0, "synthetic")
    out["training"] = {}
    warm = Dataset("synthetic", x[:128], y[:128], x[:8], y[:8], spec.labels, 255.0, "synthetic")
    train_vectors(
        model, warm, {"w": ForgetSpec(classes=(0,))}, VectorRecipe(epochs=1, batch_size=64), device=torch.device(device)
    )  # warm-up: first-call and autotuning costs stay out of the rates
    for p_vec in (1, 10):
        specs = {f"v{i}": ForgetSpec(classes=(i % a.classes,)) for i in range(p_vec)}
        recipe = VectorRecipe(epochs=1, batch_size=64, forget_share=0.5, max_parallel=16)
        t0 = time.perf_counter()
        trained = train_vectors(model, ds, specs, recipe, device=torch.device(device))
        secs = time.perf_counter() - t0
        steps = -(-n // recipe.batch_size)
        imgs = steps * recipe.batch_size * p_vec
        out["training"][f"{p_vec} vectors"] = {
            "images_per_s": imgs / secs,
            "seconds": secs,
            "images": imgs,
            "vector_seconds": [t.seconds for t in trained],
        }
        say(f"training, {p_vec} vectors: {imgs / secs:,.0f} images/s ({secs:.1f} s)")
        save()
    del ds, x

    # 2. latency with K vectors, beside the bare classifier
    batches = [int(b) for b in a.batches.split(",")]
    mdl = model.to(device)
    for b in batches:
        xb = torch.rand(b, *spec.shape, device=device)

        def bare(xb=xb):
            with torch.inference_mode():
                mdl(xb)
            if cuda:
                torch.cuda.synchronize()

        st = timed(bare, a.runs, a.warmup)
        out["latency"].append({"mode": "bare classifier, torch eager", "k": 0, "batch": b, **st})
        say(f"bare classifier eager, batch {b}: p50 {st['p50_ms']:.3f} ms")
        if cuda:
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s), torch.inference_mode():
                for _ in range(3):
                    mdl(xb)
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g), torch.inference_mode():
                mdl(xb)

            def replay(g=g):
                g.replay()
                torch.cuda.synchronize()

            st = timed(replay, a.runs, a.warmup)
            out["latency"].append({"mode": "bare classifier, cuda graph replay", "k": 0, "batch": b, **st})
            say(f"bare classifier graph replay, batch {b}: p50 {st['p50_ms']:.3f} ms")
    mdl.to("cpu")
    save()
    fp = model_fingerprint(model)
    for k in (int(v) for v in a.ks.split(",")):
        bank = VectorBank.create(fp, a.arch, spec)
        for i in range(k):
            bank.add(
                f"v{i}",
                rng.normal(0, 0.01, spec.shape).astype(np.float32),
                forgets={"kind": "class", "classes": [i % a.classes]},
                recipe={},
            )
        bank.save(root / f"bank{k}")
        t0 = time.perf_counter()
        export_onnx(root / f"bank{k}", root / f"bundle{k}", model_dir=root / "model", overwrite=True)
        out.setdefault("export_seconds", {})[str(k)] = time.perf_counter() - t0
        modes = [("torch " + ("cuda graphs" if cuda else "eager"), "torch", {"cuda_graphs": cuda})]
        modes.append(("onnxruntime", "onnxruntime", {}))
        for label, backend, opts in modes:
            try:
                rt = Runtime.load(
                    str(root / f"bundle{k}"),
                    RuntimeConfig(backend=backend, device=device, batching=BatchingConfig(max_batch_size=max(batches))),
                    opts,
                )
            except Exception as e:  # noqa: BLE001 - reported, not hidden
                out.setdefault("unavailable", {})[f"{label} k{k}"] = f"{type(e).__name__}: {e}"
                say(f"{label} K={k}: unavailable ({type(e).__name__}: {e})")
                continue
            with rt:
                eps = rt.describe().get("backend", {})
                for b in batches:
                    xb = rng.random((b, *spec.shape), dtype=np.float32)
                    st = timed(lambda xb=xb, rt=rt: rt.infer(xb, ["v0"]), a.runs, a.warmup)
                    out["latency"].append({"mode": label, "k": k, "batch": b, "backend": eps, **st})
                    say(f"{label} K={k} batch {b}: p50 {st['p50_ms']:.3f} ms p99 {st['p99_ms']:.3f} ms")
            save()

    # 3. a bank of --bank-k vectors as one contiguous block
    d = 3 * a.size * a.size
    block = np.ascontiguousarray(rng.normal(0, 0.01, (a.bank_k, d)).astype(np.float32))
    t0 = time.perf_counter()
    dev_block = torch.from_numpy(block).to(device)
    if cuda:
        torch.cuda.synchronize()
    upload = time.perf_counter() - t0
    coeffs = torch.zeros(32, a.bank_k, device=device)
    coeffs[:, 0] = 1.0

    def compose():
        coeffs @ dev_block
        if cuda:
            torch.cuda.synchronize()

    out["bank_block"] = {
        "k": a.bank_k,
        "bytes": int(block.nbytes),
        "upload_s": upload,
        "compose_b32": timed(compose, max(10, a.runs // 4), 5),
    }
    say(
        f"bank of {a.bank_k}: {block.nbytes / 2**20:.0f} MiB, upload {upload * 1e3:.1f} ms, compose batch 32 "
        f"p50 {out['bank_block']['compose_b32']['p50_ms']:.3f} ms"
    )
    save()
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
