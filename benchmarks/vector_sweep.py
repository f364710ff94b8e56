#!/usr/bin/env python
"""Sweep forget-vector recipes on one forget task of a trained model: each candidate is a preset plus
overrides; each trained vector is scored with the same metrics code (UA, RA, TA, MIA-Efficacy) and
its training time. Writes JSON as it goes (a cut-off run keeps what finished).

    python benchmarks/vector_sweep.py --model runs/report-cifar/model --data cifar10:PATH --classes 0 \\
        --recipe "paper-lr.05=paper:epochs=5,lr=0.05" --recipe "d-a16-b20=digits:epochs=5,lr=0.05,alpha=16,beta=20" \\
        --device cuda --json runs/sweep.json

Choose on the validation columns (``val_acc_drop``: accuracy the held-out images of the other classes
lose; ``UA_val``: UA on held-out images of the forgotten classes; both at the calibrated strength, from
data the model never saw); the test columns are reported beside them, not used to choose. The ``cifar``
preset was chosen on test metrics before the validation split existed (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from forgetrt.runtime.errors import InvalidInputError
from forgetrt.train import workflows as wf
from forgetrt.train.data import ForgetSpec, load_data, parse_subset
from forgetrt.train.recipes import VectorRecipe, parse_recipe

KEYS = ("UA", "RA", "TA", "MIA_efficacy")


def parse_candidate(text: str) -> tuple[str, VectorRecipe]:
    """``NAME=PRESET[:key=value,...]`` (see forgetrt.train.recipes.parse_recipe)."""
    name, _, rest = text.partition("=")
    if not name:
        raise SystemExit(f"bad --recipe {text!r}: want NAME=PRESET[:key=value,...]")
    try:
        return name, parse_recipe(rest)
    except InvalidInputError as e:
        raise SystemExit(f"bad --recipe {text!r}: {e}") from None


def subset_arg(text: str) -> tuple[int, int]:
    """argparse type for ``--subset N_TRAIN,N_TEST``: a usage error, not a traceback, when malformed."""
    try:
        return parse_subset(text)
    except InvalidInputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a ForgetRT model folder")
    p.add_argument("--data", required=True)
    task = p.add_mutually_exclusive_group(required=True)
    task.add_argument("--classes", help="class-wise task, e.g. 0 or 0,3")
    task.add_argument("--fraction", type=float, help="random data-wise task (seed 1)")
    p.add_argument("--recipe", action="append", required=True, help="NAME=PRESET[:key=value,...]; repeat")
    p.add_argument("--mia-max-per-side", type=int, default=5000)
    p.add_argument("--device", default="auto")
    p.add_argument("--bank", default="runs/sweep-bank", help="scratch bank folder for the candidates")
    p.add_argument("--json", required=True)
    p.add_argument(
        "--subset",
        type=subset_arg,
        default=None,
        help="N_TRAIN,N_TEST seeded random subset (the model's, for smoke runs)",
    )
    a = p.parse_args(argv)
    cands = [parse_candidate(r) for r in a.recipe]
    spec = (
        ForgetSpec(classes=tuple(int(c) for c in a.classes.split(",")))
        if a.classes
        else ForgetSpec(fraction=a.fraction, seed=1)
    )
    ds = load_data(a.data)
    if a.subset:
        ds = ds.subset(*a.subset, seed=0)
    res: dict = {}
    for name, recipe in cands:
        t0 = time.perf_counter()
        trained = wf.train_vector(
            a.model, ds, a.bank, {name: spec}, recipe, device=a.device, evaluate_after=False, overwrite=True
        )
        seconds = time.perf_counter() - t0
        m = wf.evaluate_result(
            a.model, ds, bank_dir=a.bank, vector=name, forget=spec, device=a.device, mia_max_per_side=a.mia_max_per_side
        )
        cal = trained[0]["calibration"]
        chosen = next((g for g in cal.get("grid", []) if g["strength"] == cal["strength"]), {})
        val = {k: chosen[k] for k in ("val_acc_drop", "UA_val", "proxy_gap") if k in chosen}
        res[name] = {
            "validation": val,
            **{k: m[k] for k in (*KEYS, "TA_original", "TA_drop")},
            "strength": trained[0]["strength"],
            "seconds": seconds,
            "recipe": recipe.to_dict(),
            "recipe_text": dict(r.partition("=")[::2] for r in a.recipe)[name],
        }
        print(
            f"{name:<24} validation "
            + "  ".join(f"{k} {v:6.2f}" for k, v in val.items())
            + " | test "
            + "  ".join(f"{k} {m[k]:6.2f}" for k in (*KEYS, "TA_drop"))
            + f"  s {trained[0]['strength']:g}  {seconds:6.1f}s",
            flush=True,
        )
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"task": spec.describe(ds), "model": a.model, "results": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
