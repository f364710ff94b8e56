#!/usr/bin/env python
"""Class-wise recipes over every class of one or more models: for each recipe and model, one forget
vector per class (trained together), each calibrated on the validation split as the bank would, then
measured. Chooses a recipe on validation data only and prints the rule it used.

    forgetrt train-model --arch digits-cnn --val-fraction 0.3 --seed 0 --out runs/m30s0
    forgetrt train-model --arch digits-cnn --val-fraction 0.3 --seed 1 --out runs/m30s1
    python benchmarks/classwise_sweep.py --model runs/m30s0 --model runs/m30s1 \\
        --recipe digits=digits --recipe kd16-a0=digits:alpha=0,distill=16 --json runs/cw.json

The choice: among recipes whose calibration reached the UA target (forget set and validation images of
the class) for every class of every model, the lowest mean over models of the mean validation accuracy
drop (``val_acc_drop``: what the held-out images of the other classes lose at the chosen strength). The
test columns (remaining-class TA drop, UA, MIA-Efficacy) are reported beside it, not used to choose.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
from vector_sweep import parse_candidate, subset_arg


def calibrated(model, ds, split, vector, recipe, val_idx, val_held_out) -> tuple:
    """``vector`` calibrated on the validation split as the bank would, then measured: (the calibration,
    its grid row at the chosen strength, the metrics of ``strength * vector``)."""
    from forgetrt.train.calibrate import calibrate_vector
    from forgetrt.train.metrics import evaluate

    cal = calibrate_vector(model, ds, split, vector, recipe, val_idx=val_idx, val_held_out=val_held_out)
    row = next(r for r in cal.grid if r["strength"] == cal.strength)
    return cal, row, evaluate(model, ds, split, cal.strength * vector)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="a ForgetRT model folder; repeat")
    p.add_argument("--data", default="digits")
    p.add_argument("--recipe", action="append", required=True, help="NAME=PRESET[:key=value,...]; repeat")
    p.add_argument("--classes", default="all", help="'all' or a comma list")
    p.add_argument(
        "--subset", type=subset_arg, help="N_TRAIN,N_TEST: the subset unlearning_report.py --subset trained on"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    cands = [parse_candidate(r) for r in a.recipe]

    from forgetrt.runtime.model_folder import load_model
    from forgetrt.train import workflows as wf
    from forgetrt.train.data import ForgetSpec
    from forgetrt.train.loops import resolve_device
    from forgetrt.train.metrics import evaluate
    from forgetrt.train.vectors import train_vectors

    dev = resolve_device(a.device)
    out: dict = {"config": vars(a), "machine": {"platform": platform.platform(), "device": str(dev)}, "runs": {}}
    for model_dir in a.model:
        model, info = load_model(model_dir, dev)
        ds = wf.as_dataset(a.data, info.iospec)
        if a.subset:
            ds = ds.subset(*a.subset, seed=0)  # as unlearning_report.py draws it
        held = wf._held_out(info, ds)
        classes = range(ds.num_classes) if a.classes == "all" else [int(c) for c in a.classes.split(",")]
        specs = {f"forget-{c}": ForgetSpec(classes=(c,)) for c in classes}
        splits = {n: s.resolve(ds, held) for n, s in specs.items()}
        base = {n: evaluate(model, ds, sp, None) for n, sp in splits.items()}
        for name, recipe in cands:
            val_idx, val_ho, _ = wf._validation(info, ds, recipe, held)
            t0 = time.perf_counter()
            vectors = train_vectors(
                model, ds, specs, recipe, device=dev, held_out=held, exclude=None if val_ho else val_idx
            )
            seconds = time.perf_counter() - t0
            per_class = {}
            for v in vectors:
                cal, row, m = calibrated(model, ds, splits[v.name], v.vector, recipe, val_idx, val_ho)
                per_class[v.name] = {
                    "strength": cal.strength,
                    "reached": cal.reached,
                    "val_acc_drop": row.get("val_acc_drop"),
                    "UA_val": row.get("UA_val"),
                    "UA": m["UA"],
                    "TA_drop": base[v.name]["TA"] - m["TA"],
                    "MIA_efficacy": m["MIA_efficacy"],
                }
            rows = list(per_class.values())
            summary = {
                "seconds": seconds,
                "all_reached": all(r["reached"] for r in rows),
                "val_drop_mean": float(np.mean([r["val_acc_drop"] for r in rows])),
                "val_drop_worst": float(max(r["val_acc_drop"] for r in rows)),
                "test_UA_min": float(min(r["UA"] for r in rows)),
                "test_TA_drop_mean": float(np.mean([r["TA_drop"] for r in rows])),
                "test_TA_drop_worst": float(max(r["TA_drop"] for r in rows)),
                "test_MIA_min": float(min(r["MIA_efficacy"] for r in rows)),
            }
            out["runs"].setdefault(name, {})[model_dir] = {"summary": summary, "per_class": per_class}
            print(
                f"{model_dir} {name:14s} {seconds:6.1f}s | validation: drop mean {summary['val_drop_mean']:5.2f} "
                f"worst {summary['val_drop_worst']:5.2f}, target reached {summary['all_reached']} | test: TA drop "
                f"mean {summary['test_TA_drop_mean']:5.2f} worst {summary['test_TA_drop_worst']:5.2f}, UA min "
                f"{summary['test_UA_min']:6.2f}, MIA min {summary['test_MIA_min']:6.2f}",
                flush=True,
            )
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)
    eligible = {n: r for n, r in out["runs"].items() if all(m["summary"]["all_reached"] for m in r.values())}
    scores = {n: float(np.mean([m["summary"]["val_drop_mean"] for m in r.values()])) for n, r in eligible.items()}
    out["choice"] = {
        "rule": "lowest mean validation drop among recipes that reached the UA target for every class",
        "validation_drop_by_recipe": scores,
        "chosen": min(scores, key=scores.get) if scores else None,
    }
    print(f"chosen on validation: {out['choice']['chosen']} ({scores})")
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
