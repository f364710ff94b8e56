"""Coarse (preset) vs finer strength grid for ua-target calibration on the ten class vectors of the
CIFAR-small model: validation columns (to choose on), then test metrics of each choice.

Ran once (2026-12-07, CPU) as ``python THIS_FILE /tmp/cifb OUT.json`` at commit 1e53883, whose calibration
walked the grid without a bisection step; "fine" adds the midpoints above 1 (1.0625, 1.1875, 1.375, 1.75),
the strengths the bisection step added afterwards tries. Model and bank: benchmarks/RESULTS.md, "Refined
compositions on CIFAR-10 images"."""

import dataclasses
import json
import sys
import time

from forgetrt.runtime.bank import VectorBank
from forgetrt.runtime.model_folder import load_model
from forgetrt.train import workflows as wf
from forgetrt.train.calibrate import calibrate_vector
from forgetrt.train.data import ForgetSpec
from forgetrt.train.metrics import evaluate
from forgetrt.train.recipes import parse_recipe

model, info = load_model("/tmp/cif/model")
ds = wf.as_dataset("cifar10:.data/cifar10-jpeg.tar.gz", info.iospec).subset(10000, 2000, seed=0)
held = wf._held_out(info, ds)
coarse = parse_recipe("cifar:distill=4")
val_idx, val_ho, _ = wf._validation(info, ds, coarse, held)
grids = {
    "coarse": coarse,
    "fine": dataclasses.replace(coarse, strengths=tuple(sorted(set(coarse.strengths) | {1.0625, 1.1875, 1.375, 1.75}))),
}
bank = VectorBank.load(sys.argv[1])
out = {}
for c in range(10):
    e = bank.entry(f"forget-{c}")
    d = bank.get(f"forget-{c}") / e.recipe["calibration"]["strength"]
    split = ForgetSpec(classes=(c,)).resolve(ds, held)
    ta0 = evaluate(model, ds, split, None)["TA"]
    for g, r in grids.items():
        t = time.perf_counter()
        cal = calibrate_vector(model, ds, split, d, r, val_idx=val_idx, val_held_out=val_ho)
        cs = time.perf_counter() - t
        row = next(x for x in cal.grid if x["strength"] == cal.strength)
        m = evaluate(model, ds, split, cal.strength * d)
        out.setdefault(c, {})[g] = {
            "strength": cal.strength,
            "reached": cal.reached,
            "val_drop": row.get("val_acc_drop"),
            "UA_val": row.get("UA_val"),
            "tried": len(cal.grid),
            "calibrate_s": cs,
            "TA_drop": ta0 - m["TA"],
            **{k: m[k] for k in ("UA", "TA", "MIA_efficacy", "RA")},
        }
        print(c, g, json.dumps(out[c][g]), flush=True)
json.dump(out, open(sys.argv[2], "w"), indent=1)
