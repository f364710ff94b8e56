#!/usr/bin/env python
"""CIFAR-10 class-wise unlearning benchmark: forget vectors vs the Retrain baseline.

Trains the classifier (default ``resnet18-cifar``), one forget vector per requested class (batched),
and Retrain for the first class; evaluates everything with the same metrics code; checks the
issue's bars (original TA >= 90%; vector UA >= 99%, MIA-Efficacy >= 99%, remaining-class TA drop
<= 3 points); writes ``results.json`` and ``results.md`` under ``--out``.

GPU (the real benchmark)::

    python benchmarks/unlearning_cifar10.py --data ../shared/datasets/cifar10/cifar10-jpeg.tar.gz --out runs/cifar

CPU smoke run (plumbing only; numbers are not the benchmark)::

    python benchmarks/unlearning_cifar10.py --arch cifar-small --subset 3000,1000 --epochs 2 \
        --vector-epochs 1 --device cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from vector_sweep import subset_arg

from forgetrt.runtime.files import atomic_write_json
from forgetrt.train import workflows as wf
from forgetrt.train.data import ForgetSpec, load_data
from forgetrt.train.loops import resolve_device
from forgetrt.train.metrics import format_table
from forgetrt.train.recipes import PRESETS

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "cifar10" / "cifar10-jpeg.tar.gz"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", default=str(DEFAULT_DATA), help="CIFAR-10 archive, ImageFolder tree or cifar-10-batches-py"
    )
    p.add_argument("--arch", default="resnet18-cifar")
    p.add_argument("--epochs", type=int, default=None, help="classifier epochs (default per arch)")
    p.add_argument("--classes", default="0", help="classes to train vectors for, e.g. 0,3,5")
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    p.add_argument("--vector-epochs", type=int, default=None)
    p.add_argument("--beta", type=float, default=None)
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--forget-share", type=float, default=None)
    p.add_argument("--grad-clip", type=float, default=None)
    p.add_argument("--augment", default=None, choices=["none", "shift", "crop-flip"])
    p.add_argument("--no-retrain", action="store_true", help="skip the Retrain baseline")
    p.add_argument("--subset", type=subset_arg, default=None, help="N_TRAIN,N_TEST random subset (CPU smoke runs)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/unlearning-cifar10")
    a = p.parse_args(argv)

    out = Path(a.out)
    dev = resolve_device(a.device)
    t0 = time.perf_counter()
    ds = load_data(f"cifar10:{a.data}")
    load_s = time.perf_counter() - t0
    if a.subset:
        ds = ds.subset(*a.subset, seed=0)
    recipe = PRESETS[a.preset]
    changes = {
        k: v
        for k, v in dict(
            epochs=a.vector_epochs,
            beta=a.beta,
            alpha=a.alpha,
            forget_share=a.forget_share,
            grad_clip=a.grad_clip,
            augment=a.augment,
        ).items()
        if v is not None
    }
    recipe = replace(recipe, **changes)
    classes = [int(c) for c in a.classes.split(",")]

    model_dir, bank_dir = out / "model", out / "bank"
    rec = wf.train_model(a.arch, ds, model_dir, epochs=a.epochs, device=str(dev))
    vecs = wf.train_class_vectors(
        model_dir, ds, bank_dir, classes=classes, recipe=recipe, device=str(dev), overwrite=True
    )
    rows, checks = {}, {}
    base_ta = {}
    for c in classes:
        base_ta[c] = wf.evaluate_result(model_dir, ds, forget=ForgetSpec(classes=(c,)), device=str(dev))["TA"]
    retrain = None
    if not a.no_retrain:
        c = classes[0]
        r_rec = wf.unlearn_baseline(
            "retrain", model_dir, ds, ForgetSpec(classes=(c,)), out / f"retrain-{c}", device=str(dev)
        )
        retrain = wf.evaluate_result(out / f"retrain-{c}", ds, device=str(dev))
        retrain["seconds"] = r_rec["unlearning"]["seconds"]
        rows[f"retrain-{c}"] = retrain
    for v in vecs:
        c = v["forgets"]["classes"][0]
        m = dict(v["metrics"])
        if retrain is not None and c == classes[0]:
            m["avg_gap"] = sum(abs(m[k] - retrain[k]) for k in ("UA", "RA", "TA", "MIA_efficacy")) / 4
        m["TA_drop"] = base_ta[c] - m["TA"]
        rows[v["name"]] = m
        checks[v["name"]] = {
            "UA>=99": m["UA"] >= 99,
            "MIA>=99": m["MIA_efficacy"] >= 99,
            "TA_drop<=3": m["TA_drop"] <= 3,
        }
    checks["original"] = {"test_acc>=90": rec["metrics"]["test_acc"] >= 90}
    table = format_table(rows, ("UA", "RA", "TA", "TA_drop", "MIA_efficacy", "avg_gap", "seconds"))
    env = {
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d"),
    }
    result = {
        "config": {**vars(a), "recipe": recipe.to_dict()},
        "env": env,
        "data_load_seconds": load_s,
        "original": {"arch": a.arch, **rec["metrics"], "train_seconds": rec["training"]["seconds"]},
        "rows": rows,
        "checks": checks,
    }
    atomic_write_json(out / "results.json", result)
    md = [
        f"# CIFAR-10 class-wise unlearning ({a.arch}) — {env['device']}, {env['date']}",
        "",
        f"Original: test accuracy {rec['metrics']['test_acc']:.2f}% (trained in {rec['training']['seconds']:.1f}s)",
        "",
        "```",
        table,
        "```",
        "",
        "Checks: " + json.dumps(checks),
        "",
        f"Command: `python benchmarks/unlearning_cifar10.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
    ]
    (out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
