#!/usr/bin/env python
"""Can a client bring back a class that a mandatory vector forgets, with allowed requests only?

Two black-box attacks against a served bundle (through ``Runtime.infer``, exactly what the server runs),
each with and without the output guard (``export onnx --guard``):

1. **coefficient search**: the attacker picks the selectable coefficients (inside the bundle's range)
   that make the most of their own images of the forgotten class come out right: random search, then
   greedy coordinate steps from the best row. Success is measured on other images of that class.
2. **input perturbation**: the attacker edits the pixels of each image (SimBA-style: a random pixel
   moved ±ε and kept if the true class's probability rises), within an L∞ budget.

Reports queries spent against the forgotten class's accuracy restored. Digits on CPU by default::

    python benchmarks/restore_attack.py --out runs/restore-attack

(the numbers in SECURITY.md come from this command).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def coefficient_search(rt, probe, target: int, lo: float, hi: float, budget: int, rng) -> tuple[np.ndarray, list]:
    """Best allowed coefficient row for the attacker's probe images; (row, [(queries, probe accuracy)])."""
    k = rt.snapshot.k
    queries, trace = 0, []

    def score(row):
        nonlocal queries
        queries += 1
        return float((rt.infer(probe, coeffs=row).predictions == target).mean())

    best = np.zeros(k, np.float32)
    best_s = score(best)
    while queries < budget // 2:  # random search over the box
        row = rng.uniform(lo, hi, k).astype(np.float32)
        s = score(row)
        if s > best_s:
            best, best_s = row, s
        trace.append((queries, best_s))
    step = (hi - lo) / 4
    while queries < budget:  # greedy coordinate steps from the best row
        improved = False
        for i in rng.permutation(k):
            for d in (step, -step):
                row = best.copy()
                row[i] = np.clip(row[i] + d, lo, hi)
                s = score(row)
                if s > best_s:
                    best, best_s, improved = row, s, True
                trace.append((queries, best_s))
                if queries >= budget:
                    break
            if queries >= budget:
                break
        if not improved:
            step /= 2
    return best, trace


def input_perturbation(rt, x: np.ndarray, target: int, eps: float, budget: int, rng) -> tuple[np.ndarray, int]:
    """SimBA-style per-image pixel search; the perturbed images and the queries spent."""
    x = x.copy()
    out = x.copy()
    queries = 0
    flat = x[0].size
    for i in range(len(x)):
        img = x[i : i + 1].copy()
        p = float(_softmax(rt.infer(img).logits)[0, target])
        queries += 1
        for j in rng.permutation(flat)[: budget - 1]:
            for d in (eps, -eps):
                cand = img.copy().reshape(-1)
                cand[j] = np.clip(x[i].reshape(-1)[j] + d, 0.0, 1.0)
                cand = cand.reshape(img.shape)
                q = float(_softmax(rt.infer(cand).logits)[0, target])
                queries += 1
                if q > p:
                    img, p = cand, q
                    break
            if rt.infer(img).predictions[0] == target:
                queries += 1
                break
        out[i] = img[0]
    return out, queries


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/restore-attack")
    p.add_argument("--target", type=int, default=9, help="the class the mandatory vector forgets")
    p.add_argument("--range", default="-0.2,1", help="the bundle's coefficient range LO,HI")
    p.add_argument("--coeff-budget", type=int, default=650, help="queries for the coefficient search")
    p.add_argument("--pixel-budget", type=int, default=300, help="queries per image for the pixel search")
    p.add_argument("--pixel-images", type=int, default=20)
    p.add_argument("--eps", type=float, default=0.25, help="L-inf budget of the pixel search, in [0, 1] pixels")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from forgetrt.export.onnx_export import export_onnx
    from forgetrt.runtime import Runtime, RuntimeConfig
    from forgetrt.train import workflows as wf
    from forgetrt.train.data import load_data
    from forgetrt.train.recipes import PRESETS

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ds = load_data("digits")
    if not (out / "model" / "model.json").is_file():
        wf.train_model("digits-cnn", ds, out / "model", device="cpu")
        wf.train_class_vectors(out / "model", ds, out / "bank", recipe=PRESETS["digits"], device="cpu", overwrite=True)
    lo, hi = (float(v) for v in a.range.split(","))
    selectable = [f"forget-{c}" for c in range(10) if c != a.target]
    for name, guard in (("unguarded", False), ("guarded", True)):
        export_onnx(
            out / "bank",
            out / name,
            model_dir=out / "model",
            vectors=selectable,
            mandatory={f"forget-{a.target}": 1.0},
            coeff_range=(lo, hi),
            guard=guard,
            overwrite=True,
        )
    xs = (ds.x_test[ds.y_test == a.target] / ds.scale).astype(np.float32)
    probe, held = xs[: len(xs) // 2], xs[len(xs) // 2 :]  # the attacker's images, and the ones success is measured on
    report: dict = {"config": vars(a), "images": {"probe": len(probe), "evaluated": len(held)}, "results": {}}
    for name in ("unguarded", "guarded"):
        rng = np.random.default_rng(a.seed)
        with Runtime.load(out / name, RuntimeConfig(backend="onnxruntime", device="cpu")) as rt:
            base = float((rt.infer(held).predictions == a.target).mean() * 100)
            best, trace = coefficient_search(rt, probe, a.target, lo, hi, a.coeff_budget, rng)
            restored = float((rt.infer(held, coeffs=best).predictions == a.target).mean() * 100)
            curve = {q: round(100 * s, 1) for q, s in trace if q in (10, 50, 100, 200, 325, 500, a.coeff_budget)}
            imgs = held[: a.pixel_images]
            perturbed, spent = input_perturbation(rt, imgs, a.target, a.eps, a.pixel_budget, rng)
            pixel = float((rt.infer(perturbed).predictions == a.target).mean() * 100)
            report["results"][name] = {
                "forgotten_class_accuracy": base,
                "coefficient_search": {
                    "queries": a.coeff_budget,
                    "restored_accuracy": restored,
                    "probe_accuracy_by_queries": curve,
                    "best_row": best.round(3).tolist(),
                },
                "input_perturbation": {
                    "images": len(imgs),
                    "eps": a.eps,
                    "queries": spent,
                    "queries_per_image": spent / len(imgs),
                    "restored_accuracy": pixel,
                },
            }
        print(
            f"{name:>9}: class {a.target} accuracy {base:.1f}% -> coefficient search ({a.coeff_budget} queries) "
            f"{restored:.1f}%, pixel search (eps {a.eps}, {spent / len(imgs):.0f} queries/image) {pixel:.1f}%",
            flush=True,
        )
    report["seconds"] = time.perf_counter() - t0
    (out / "restore_attack.json").write_text(json.dumps(report, indent=1))
    print(f"json: {out / 'restore_attack.json'} ({report['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
