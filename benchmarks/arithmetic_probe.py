#!/usr/bin/env python
"""Forget-vector arithmetic, probed over many tasks: for each multi-class target, a directly trained
vector, the plain sum of the target classes' vectors, and learned compositions (variants of basis and
learning rate), each calibrated on the validation split as the bank would, then measured.

    python benchmarks/unlearning_report.py --out runs/report-digits          # model + ten class vectors
    python benchmarks/arithmetic_probe.py --report runs/report-digits --json runs/arith.json

``--report`` is an ``unlearning_report.py`` output folder (its ``model/`` and ``bank/`` with
``forget-0`` ... ``forget-9``); the class vectors are used as stored (already calibrated). A variant is
``NAME=BASIS[:lr_scale=X,epochs=N]``: BASIS ``all`` (every class vector, as the report does) or
``targets`` (only the target classes' vectors); ``lr_scale`` multiplies the composition recipe's
learning rate (the class recipe's, with a tenth of its epochs, as in the report).

Choose on the validation columns (``val_drop``: accuracy the held-out images of the other classes lose
at the calibrated strength); the test columns are reported beside them, not used to choose.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace

import numpy as np
from classwise_sweep import calibrated

DEFAULT_TASKS = "0,3;1,7;2,8;4,9;5,6;0,3,5;1,4,7;2,6,9"
DEFAULT_VARIANTS = ("learned=all", "learned, lr/10=all:lr_scale=0.1", "learned, targets only=targets")


def _variant(text: str) -> tuple[str, str, dict]:
    name, eq, rest = text.partition("=")
    basis, _, over = rest.partition(":")
    if not eq or not name or basis not in ("all", "targets"):
        raise SystemExit(f"bad --variant {text!r}: want NAME=all|targets[:lr_scale=X,epochs=N]")
    kw: dict = {}
    for item in filter(None, over.split(",")):
        k, _, v = item.partition("=")
        if k not in ("lr_scale", "epochs"):
            raise SystemExit(f"bad --variant {text!r}: {k!r} is not lr_scale or epochs")
        kw[k] = int(v) if k == "epochs" else float(v)
    return name, basis, kw


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", required=True, help="an unlearning_report.py output folder")
    p.add_argument("--data", default="digits")
    p.add_argument("--preset", default="digits", help="the class vectors' recipe (PRESET[:key=value,...])")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help="multi-class targets, ';'-separated")
    p.add_argument("--variant", action="append", help="NAME=all|targets[:lr_scale=X,epochs=N]; repeat")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)

    from forgetrt.runtime.bank import VectorBank
    from forgetrt.runtime.model_folder import load_model
    from forgetrt.train import workflows as wf
    from forgetrt.train.data import ForgetSpec
    from forgetrt.train.loops import predict_logits, resolve_device
    from forgetrt.train.recipes import parse_recipe
    from forgetrt.train.vectors import learn_composition, train_vectors

    variants = [_variant(v) for v in (a.variant or DEFAULT_VARIANTS)]
    tasks = [tuple(int(c) for c in t.split(",")) for t in a.tasks.split(";") if t]
    dev = resolve_device(a.device)
    model, info = load_model(f"{a.report}/model", dev)
    ds = wf.as_dataset(a.data, info.iospec)
    held = wf._held_out(info, ds)
    recipe = parse_recipe(a.preset)
    val_idx, val_ho, _ = wf._validation(info, ds, recipe, held)
    exclude = None if val_ho else val_idx
    bank = VectorBank.load(f"{a.report}/bank")
    needed = sorted({c for t in tasks for c in t})
    missing = [c for c in needed if f"forget-{c}" not in bank.names]
    if missing:
        raise SystemExit(f"{a.report}/bank has no class vector for classes {missing}")
    basis_all = {f"forget-{c}": bank.get(f"forget-{c}") for c in range(ds.num_classes) if f"forget-{c}" in bank.names}
    compose = replace(recipe, epochs=max(1, recipe.epochs // 10))

    def score(vec: np.ndarray, spec: ForgetSpec) -> dict:
        cal, row, m = calibrated(model, ds, spec.resolve(ds, held), vec, recipe, val_idx, val_ho)
        return {
            "strength": cal.strength,
            "reached": cal.reached,
            "val_drop": row.get("val_acc_drop"),
            "UA": m["UA"],
            "TA": m["TA"],
        }

    specs = {t: ForgetSpec(classes=t) for t in tasks}
    t0 = time.perf_counter()
    direct = train_vectors(
        model, ds, {str(t): s for t, s in specs.items()}, recipe, device=dev, held_out=held, exclude=exclude
    )
    rows: dict[str, dict] = {"direct vector": {}, "plain sum": {}}
    seconds = {"direct vector": (time.perf_counter() - t0) / len(tasks), "plain sum": 0.0}
    for t, v in zip(tasks, direct):
        rows["direct vector"][t] = score(v.vector, specs[t])
        rows["plain sum"][t] = score(sum(basis_all[f"forget-{c}"] for c in t), specs[t])

    # why sums fail: each class vector sends its class to a neighbour; if that neighbour is forgotten too,
    # its own vector pulls images away from it (often back): per target class, the share still recognised
    # under the plain sum at strength 1 and where the rest go
    def share(pred: np.ndarray, c: int) -> float:
        return float(100 * np.mean(pred[ds.y_train == c] == c))

    def goes_to(pred: np.ndarray, c: int) -> int:
        counts = np.bincount(pred[ds.y_train == c], minlength=ds.num_classes)
        counts[c] = -1
        return int(counts.argmax())

    alone = {c: predict_logits(model, ds.x_train, ds.scale, basis_all[f"forget-{c}"]).argmax(1) for c in needed}
    escape: dict[str, dict] = {}
    for t in tasks:
        both = predict_logits(model, ds.x_train, ds.scale, sum(basis_all[f"forget-{c}"] for c in t)).argmax(1)
        escape[",".join(map(str, t))] = {
            str(c): {
                "recognised_alone": share(alone[c], c),
                "mostly_goes_to_alone": goes_to(alone[c], c),
                "recognised_in_sum": share(both, c),
            }
            for c in t
        }
    for name, basis, kw in variants:
        rec = replace(compose, lr=compose.lr * kw.get("lr_scale", 1.0), epochs=kw.get("epochs", compose.epochs))
        rows[name], spent = {}, 0.0
        for t in tasks:
            targets = [f"forget-{c}" for c in t]
            b = basis_all if basis == "all" else {k: basis_all[k] for k in targets}
            t1 = time.perf_counter()
            tv = learn_composition(
                model,
                ds,
                specs[t],
                b,
                rec,
                device=dev,
                held_out=held,
                exclude=exclude,
                init=dict.fromkeys(targets, 1.0),
            )
            spent += time.perf_counter() - t1
            rows[name][t] = {**score(tv.vector, specs[t]), "coefficients": tv.coefficients}
        seconds[name] = spent / len(tasks)

    summary = {}
    heads = ("val drop", "missed", "UA vs direct", "TA vs direct: mean", "worst", "s/task")
    print(f"{'method':26s} " + " ".join(f"{h:>{w}s}" for h, w in zip(heads, (8, 6, 12, 18, 6, 7))))
    for name, r in rows.items():
        d_ta = [rows["direct vector"][t]["TA"] - r[t]["TA"] for t in tasks]
        d_ua = [rows["direct vector"][t]["UA"] - r[t]["UA"] for t in tasks]
        summary[name] = {
            "val_drop_mean": float(np.mean([r[t]["val_drop"] for t in tasks])),
            "missed_ua_target": sum(not r[t]["reached"] for t in tasks),
            "UA_below_direct_mean": float(np.mean(d_ua)),
            "TA_below_direct_mean": float(np.mean(d_ta)),
            "TA_below_direct_worst": float(max(d_ta)),
            "seconds_per_task": seconds[name],
        }
        s = summary[name]
        print(
            f"{name:26s} {s['val_drop_mean']:8.2f} {s['missed_ua_target']:6d} {s['UA_below_direct_mean']:12.2f} "
            f"{s['TA_below_direct_mean']:18.2f} {s['TA_below_direct_worst']:6.2f} {s['seconds_per_task']:7.2f}"
        )
    out = {
        "config": vars(a),
        "machine": {"platform": platform.platform(), "device": str(dev)},
        "summary": summary,
        "plain_sum_at_strength_1": escape,
        "per_task": {n: {",".join(map(str, t)): v for t, v in r.items()} for n, r in rows.items()},
    }
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
