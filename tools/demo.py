"""The main job on the embedded default (sklearn digits, no download), end to end on CPU in about a minute:
train the classifier, one forget vector per class, a fixed, a learned and a refined 2-class composition,
evaluate everything, write ``report.json``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forgetrt.export.onnx_export import export_onnx
from forgetrt.export.parity import format_parity, run_parity
from forgetrt.runtime.files import atomic_write_json
from forgetrt.train import workflows as wf
from forgetrt.train.data import ForgetSpec, load_data
from forgetrt.train.metrics import format_table
from forgetrt.train.recipes import PRESETS, composition_recipe

__all__ = ["run_demo", "DEMO_PAIR"]


def _serve_mixed_batch(bundle_dir: Path, ds) -> dict[str, Any]:
    """Load the bundle in the runtime and send one test image of class 3 under several compositions at
    once: the dynamic batcher runs them as one heterogeneous engine call."""
    import numpy as np

    from forgetrt.runtime import BatchingConfig, Runtime, RuntimeConfig

    x = (ds.x_test[ds.y_test == 3][:1].astype(np.float32) / ds.scale).astype(np.float32)
    forgets = [None, ["forget-3"], ["forget-5"], {"forget-0": 1.0, "forget-3": 1.0}, {"forget-3": 0.5}]
    config = RuntimeConfig(backend="onnxruntime", device="cpu", batching=BatchingConfig(max_queue_delay_us=20_000))
    with Runtime.load(bundle_dir, config) as rt:
        futures = [rt.submit(x, f) for f in forgets]
        results = [f.result(30) for f in futures]
        backend = rt.backend_name
    calls = len({(r.compute_us, r.batch_images) for r in results})
    rows = [
        {
            "forget": f if f is not None else "none",
            "true": ds.classes[3],
            "predicted": ds.classes[int(r.predictions[0])],
        }
        for f, r in zip(forgets, results)
    ]
    return {"backend": backend, "requests": len(forgets), "engine_calls": calls, "rows": rows}


DEMO_PAIR = (0, 3)


def run_demo(out: str | os.PathLike, *, device: str = "cpu", log: Callable[[str], None] = print) -> dict[str, Any]:
    out = Path(out)
    t0 = time.perf_counter()
    ds = load_data("digits")
    model_dir, bank_dir = out / "model", out / "bank"
    log(f"[1/5] training digits-cnn on {len(ds.y_train)} digits images -> {model_dir}")
    rec = wf.train_model("digits-cnn", ds, model_dir, device=device)
    log(f"      test accuracy {rec['metrics']['test_acc']:.2f}% in {rec['training']['seconds']:.1f}s")

    recipe = PRESETS["digits"]
    log(f"[2/5] training {ds.num_classes} class-wise forget vectors together (preset 'digits') -> {bank_dir}")
    vecs = wf.train_class_vectors(model_dir, ds, bank_dir, recipe=recipe, device=device, overwrite=True)

    a, b = DEMO_PAIR
    log(
        f"[3/5] forget-vector arithmetic for classes {a} and {b}: fixed sum, learned coefficients and a refined sum "
        "(a tenth of the training steps)"
    )
    wf.compose_fixed(bank_dir, f"sum-{a}-{b}", {f"forget-{a}": 1.0, f"forget-{b}": 1.0}, overwrite=True)
    composed = {
        method: wf.compose_learned(
            bank_dir,
            f"{label}-{a}-{b}",
            model_dir,
            ds,
            ForgetSpec(classes=DEMO_PAIR),
            composition_recipe(recipe, method),
            device=device,
            overwrite=True,
            method=method,
        )
        for method, label in (("learn", "learned"), ("refine", "refined"))
    }
    learned = composed["learn"]

    log("[4/5] evaluating (UA, RA, TA on remaining classes, MIA-Efficacy; percent)")
    rows: dict[str, dict[str, Any]] = {
        f"no vector (classes {a},{b})": wf.evaluate_result(
            model_dir, ds, forget=ForgetSpec(classes=DEMO_PAIR), device=device
        )
    }
    for v in vecs:
        rows[v["name"]] = v["metrics"]
    rows[f"sum-{a}-{b}"] = wf.evaluate_result(model_dir, ds, bank_dir=bank_dir, vector=f"sum-{a}-{b}", device=device)
    for res in composed.values():
        rows[res["name"]] = res["metrics"]
    table = format_table(rows)

    bundle_dir = out / "bundle"
    log(f"[5/5] exporting the fused ONNX bundle (image, coeffs -> logits) -> {bundle_dir}")
    exported = export_onnx(bank_dir, bundle_dir, model_dir=model_dir, vectors=[v["name"] for v in vecs], overwrite=True)
    parity = run_parity(bundle_dir, device=device)
    served = _serve_mixed_batch(bundle_dir, ds)
    report = {
        "data": "digits",
        "model": {"arch": "digits-cnn", **rec["metrics"], "fingerprint": rec["fingerprint"]},
        "recipe": recipe.to_dict(),
        "results": rows,
        "learned_coefficients": learned["coefficients"],
        "seconds": time.perf_counter() - t0,
        "artifacts": {"model": str(model_dir), "bank": str(bank_dir), "bundle": str(bundle_dir)},
        "export": {"bundle_id": exported["bundle_id"], "vectors": exported["vectors"], "parity": parity["backends"]},
        "served": served,
    }
    atomic_write_json(out / "report.json", report)
    log("")
    log(table)
    log("")
    ua = learned["metrics"].get("UA_per_class", {})
    log("learned composition UA per class: " + ", ".join(f"{k}: {v:.1f}%" for k, v in ua.items()))
    log(format_parity(parity))
    log("")
    log(
        f"served through the runtime ({served['backend']}): {served['requests']} requests with different compositions "
        f"shared {served['engine_calls']} engine call(s)"
    )
    for r in served["rows"]:
        log(f"  true {r['true']}  forget {r['forget']!s:<28} -> predicted {r['predicted']}")
    log(f"report: {out / 'report.json'}  ({report['seconds']:.1f}s)")
    return report
