#!/usr/bin/env python
"""The paper-style comparison: forget vectors vs model-based unlearning (Retrain, FT, GA, RL).

Tables (UA, RA, TA, MIA-Efficacy, Avg.Gap vs Retrain, wall time; percent):
1. class-wise forgetting over ``--classes`` (default: every class), mean ± std and worst, with the
   original model's accuracy on the remaining classes (TA drop), a "no vector" row and a trivial
   "output mask" reference row (the forgotten class masked at the logits: what input-space forgetting
   adds and costs); Retrain/FT/GA/RL on ``--baseline-classes``;
2. random data-wise forgetting for each of ``--fractions``: no vector, Retrain, FT, GA, RL, the vector
   as trained and the default (calibrated) vector;
3. forget-vector arithmetic: learned compositions of the ten class vectors vs a directly trained
   vector, for a 2-class, a 3-class and a mixed subset (part of one class and part of another).
The original model holds out ``--val-fraction`` of the training set (never trained on), which vector
tuning validates on; test data are only measured. Every method uses the same data splits, the same
metrics code and the same Retrain reference. Writes ``report.md``, ``report.json`` and
``tradeoff.png`` (UA vs TA) under ``--out``, saving after every stage.

Digits on CPU (minutes)::

    python benchmarks/unlearning_report.py --out runs/report-digits

CIFAR-10 on a GPU::

    python benchmarks/unlearning_report.py --data cifar10:../shared/datasets/cifar10/cifar10-jpeg.tar.gz \\
        --arch resnet18-cifar --preset cifar --device cuda --out runs/report-cifar
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from vector_sweep import subset_arg

from forgetrt.runtime.bank import VectorBank
from forgetrt.runtime.files import atomic_write_json
from forgetrt.runtime.model_folder import read_model_manifest
from forgetrt.train import workflows as wf
from forgetrt.train.data import ForgetSpec, load_data
from forgetrt.train.recipes import composition_recipe, parse_recipe

KEYS = ("UA", "RA", "TA", "MIA_efficacy")
METHODS = ("retrain", "ft", "ga", "rl")


class Budget:
    """What is left of ``--time-budget`` (seconds from ``t_start``), and whether a stage fits in it: a stage
    that does not is logged and listed in ``skipped``. The estimate is the larger of the caller's formula and
    the measured duration of the last finished task of the same ``kind`` (``timed``): the formulas scale with
    the base model's training time, which says little where fixed costs such as evaluation dominate."""

    def __init__(self, seconds: float | None, t_start: float, log, skipped: list[str], clock=time.perf_counter):
        self.seconds, self.t_start, self.log, self.skipped, self.clock = seconds, t_start, log, skipped, clock
        self.timed: dict[str, float] = {}

    def fits(self, stage: str, estimate: float, kind: str | None = None) -> bool:
        if self.seconds is None:
            return True
        estimate = max(estimate, self.timed.get(kind, 0.0))
        left = self.seconds - (self.clock() - self.t_start)
        if estimate <= left:
            return True
        self.log(f"  skipped {stage}: about {estimate:.0f}s needed, {left:.0f}s left of the budget")
        self.skipped.append(stage)
        return False


def _gap(r: dict, ref: dict) -> float:
    return float(np.mean([abs(r[k] - ref[k]) for k in KEYS]))


COLUMNS = (*KEYS, "TA_drop", "avg_gap", "seconds")


def _mean_std(tasks: list[dict[str, dict]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per method, mean and std of each column over the tasks it ran on (a column it has no value for is left out)."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for m in dict.fromkeys(m for t in tasks for m in t):
        out[m] = {}
        for k in COLUMNS:
            v = np.array([t[m][k] for t in tasks if m in t and k in t[m]], float)
            if len(v):
                out[m][k] = (float(v.mean()), float(v.std()))
    return out


def _md_table(rows: dict[str, dict[str, Any]], with_std: bool) -> list[str]:
    head = "| method | UA | RA | TA | MIA-Efficacy | TA drop | Avg.Gap vs Retrain | time (s) |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for m, r in rows.items():

        def cell(k: str) -> str:
            v = r.get(k)
            if v is None:
                return "-"
            return f"{v[0]:.2f} ± {v[1]:.2f}" if with_std else f"{v:.2f}"

        lines.append(f"| {m} | " + " | ".join(cell(k) for k in COLUMNS) + " |")
    return lines


def _mixed_spec(ds, held_out, text: str, seed: int) -> ForgetSpec:
    """'3=0.5,7=0.1': half of class 3's and a tenth of class 7's training images (outside the held-out split)."""
    rng = np.random.default_rng(seed)
    picked = []
    for part in text.split(","):
        c, f = part.split("=")
        idx = np.flatnonzero(ds.y_train == ds.class_index(c))
        idx = idx[~np.isin(idx, held_out)] if held_out is not None else idx
        picked.append(rng.choice(idx, int(round(float(f) * len(idx))), replace=False))
    return ForgetSpec(indices=tuple(int(i) for i in np.sort(np.concatenate(picked))), indices_source=f"mixed {text}")


def _worst(tasks: list[dict[str, dict]], method: str) -> dict[str, float]:
    rows = [t[method] for t in tasks if method in t]
    return {
        "UA": min(r["UA"] for r in rows),
        "MIA_efficacy": min(r["MIA_efficacy"] for r in rows),
        "TA_drop": max(r.get("TA_drop", 0.0) for r in rows),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits")
    p.add_argument("--arch", default="digits-cnn")
    p.add_argument("--classes", default="all", help="classes for the class-wise table ('all' or e.g. 0,3,7)")
    p.add_argument("--baseline-classes", default="0,3", help="classes Retrain/FT/GA/RL run on ('none' to skip)")
    p.add_argument("--fractions", default="0.01,0.1", help="random data-wise tasks (seed 1)")
    p.add_argument("--pair", default="0,3", help="2-class task for the arithmetic table")
    p.add_argument("--triple", default="0,3,5", help="3-class task for the arithmetic table")
    p.add_argument("--mixed", default="3=0.5,7=0.1", help="mixed subset for the arithmetic table (class=fraction,...)")
    p.add_argument(
        "--preset", default="digits", help="class-wise recipe: a preset, or PRESET:key=value,... (e.g. cifar:distill=4)"
    )
    p.add_argument("--random-preset", default="paper", help="recipe for the random tasks (same form)")
    p.add_argument("--vector-epochs", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None, help="classifier (and so Retrain) epochs")
    p.add_argument(
        "--model", default=None, help="reuse this model folder instead of training one (e.g. a first call's)"
    )
    p.add_argument(
        "--stages",
        default="class,random,arithmetic",
        help="which tables to build (a GPU run can split them over calls; arithmetic reuses the bank's class vectors)",
    )
    p.add_argument("--val-fraction", type=float, default=0.1, help="held out of the classifier's training")
    p.add_argument(
        "--mia-max-per-side",
        type=int,
        default=5000,
        help="cap on members and non-members the MIA's SVC is fit on (RBF SVC cost grows quadratically)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds: a stage that would likely not finish in what is left is skipped (and listed as skipped)",
    )
    p.add_argument("--subset", type=subset_arg, default=None, help="N_TRAIN,N_TEST seeded random subset (smoke runs)")
    p.add_argument(
        "--image-size", type=int, default=None, help="resize imagefolder data to this side (e.g. 224 for CIFAR-10)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/unlearning-report")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    ds = load_data(a.data, image_size=a.image_size)
    if a.subset:
        ds = ds.subset(*a.subset, seed=0)
    report_data_s = time.perf_counter() - t_start

    def epochs(r):
        return r if a.vector_epochs is None else replace(r, epochs=a.vector_epochs, epoch_share=1.0)

    recipe, rand_recipe = epochs(parse_recipe(a.preset)), epochs(parse_recipe(a.random_preset))
    env = {
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": a.device,
    }
    try:
        import torch

        env["torch"] = torch.__version__
        if a.device.startswith("cuda"):
            env["device_name"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    report: dict[str, Any] = {
        "config": vars(a),
        "env": env,
        "recipe": recipe.to_dict(),
        "random_recipe": rand_recipe.to_dict(),
        "skipped": [],
        "complete": False,
        "data_load_seconds": report_data_s,
    }
    if a.model and (out / "report.json").is_file():  # a later call of a split run: keep the earlier tables
        import json

        earlier = json.loads((out / "report.json").read_text())
        report = {**earlier, **{k: report[k] for k in ("config", "env", "skipped", "complete")}}
        report["calls"] = [*earlier.get("calls", [earlier["config"]]), vars(a)]

    def save() -> None:
        report["total_seconds"] = time.perf_counter() - t_start
        atomic_write_json(out / "report.json", report)
        _write_md(report, out / "report.md", argv)
        if report.get("class_wise", {}).get("per_class") or report.get("random"):
            _plot(report.get("class_wise", {}).get("per_class", []), report.get("random", {}), out / "tradeoff.png")

    budget = Budget(a.time_budget, t_start, log, report["skipped"])
    fits = budget.fits

    ev = {"device": a.device, "mia_max_per_side": a.mia_max_per_side}
    stages = set(a.stages.split(","))
    if a.model:
        log(f"[1/4] original: reusing {a.model}")
        model_dir = Path(a.model)
        rec = read_model_manifest(model_dir).to_dict()
    else:
        log(f"[1/4] original {a.arch} on {a.data} (holding out {a.val_fraction:.0%})")
        model_dir = out / "model"
        rec = wf.train_model(
            a.arch, ds, model_dir, epochs=a.epochs, device=a.device, val_fraction=a.val_fraction or None
        )
    train_s = rec["training"]["seconds"]
    # a vector epoch costs about a training epoch of the classifier (a forward and a backward per image)
    vector_s = train_s * recipe.epochs * recipe.epoch_share / max(1, int(rec["training"].get("epochs") or 1))
    report["original"] = {**rec["metrics"], "train_seconds": train_s, "epochs": rec["training"]["epochs"]}
    held_out = wf.held_out_indices(model_dir, ds)
    save()

    classes = list(range(ds.num_classes)) if a.classes == "all" else [int(c) for c in a.classes.split(",")]
    baseline_classes = [] if a.baseline_classes == "none" else [int(c) for c in a.baseline_classes.split(",")]
    log(f"[2/4] class-wise forgetting, classes {classes} (baselines on {baseline_classes})")
    class_tasks: list[dict] = []
    if "class" in stages and fits("class-wise vectors", vector_s * len(classes)):
        t0 = time.perf_counter()
        trained = wf.train_class_vectors(
            model_dir,
            ds,
            out / "bank",
            classes=classes,
            recipe=recipe,
            device=a.device,
            evaluate_after=False,
            overwrite=True,
        )
        per_vector_s = (time.perf_counter() - t0) / len(classes)
        report["class_vectors"] = {
            t["name"]: {"strength": t["strength"], "calibration": t["calibration"]} for t in trained
        }
        for c in classes:
            spec = ForgetSpec(classes=(c,))
            task = {
                "no vector": wf.evaluate_result(model_dir, ds, forget=spec, **ev),
                "output mask": wf.evaluate_result(model_dir, ds, forget=spec, mask_forgotten=True, **ev),
                "forget vector": wf.evaluate_result(model_dir, ds, bank_dir=out / "bank", vector=f"forget-{c}", **ev),
            }
            task["no vector"]["seconds"] = task["output mask"]["seconds"] = 0.0
            task["forget vector"]["seconds"] = per_vector_s
            if c in baseline_classes and fits(f"baselines for class {c}", 1.8 * train_s, "baselines"):
                t0 = time.perf_counter()
                task.update(run_baselines(f"class{c}", spec, ds, model_dir, out, ev))
                budget.timed["baselines"] = time.perf_counter() - t0
                for r in task.values():
                    r["avg_gap"] = _gap(r, task["retrain"])
            class_tasks.append(task)
            fv = task["forget vector"]
            log(
                f"  class {c}: UA {fv['UA']:.2f} TA {fv['TA']:.2f} (drop {fv['TA_drop']:.2f}) "
                f"MIA {fv['MIA_efficacy']:.2f}"
            )
            report["class_wise"] = {
                "classes": classes[: len(class_tasks)],
                "baseline_classes": baseline_classes,
                "per_class": class_tasks,
                "mean_std": _mean_std(class_tasks),
                "worst": _worst(class_tasks, "forget vector"),
                "seconds_per_vector": per_vector_s,
            }
            save()

    report.setdefault("random", {})
    fractions = [float(f) for f in a.fractions.split(",") if f]
    log(f"[3/4] random data-wise forgetting: {fractions}")
    for frac in fractions if "random" in stages else []:
        name = f"random {frac:g}"
        if not fits(name, 2.0 * train_s, "random"):
            continue
        t0 = time.perf_counter()
        spec = ForgetSpec(fraction=frac, seed=1)
        # Retrain, no vector and the vectors first (the no-harm check needs only these), then FT/GA/RL
        task = run_baselines(f"random{frac:g}", spec, ds, model_dir, out, ev, methods=("retrain",))
        task["no vector"] = wf.evaluate_result(model_dir, ds, forget=spec, **ev)
        task["no vector"]["seconds"] = 0.0
        for label, r_ in (
            ("vector, as trained", replace(rand_recipe, calibrate="none")),
            ("forget vector", rand_recipe),
        ):
            vname = f"fv-random{frac:g}" + ("-raw" if label != "forget vector" else "")
            res = wf.train_vector(
                model_dir, ds, out / "bank", {vname: spec}, r_, device=a.device, evaluate_after=False, overwrite=True
            )
            task[label] = wf.evaluate_result(model_dir, ds, bank_dir=out / "bank", vector=vname, forget=spec, **ev)
            task[label].update(seconds=res[0]["seconds"], strength=res[0]["strength"])
        for others in (False, True):
            if others:
                task.update(run_baselines(f"random{frac:g}", spec, ds, model_dir, out, ev, methods=METHODS[1:]))
            for r in task.values():
                r["avg_gap"] = _gap(r, task["retrain"])
            report["random"][name] = task
            save()
        budget.timed["random"] = time.perf_counter() - t0
        log("  " + name + ": " + ", ".join(f"{m} gap {r['avg_gap']:.2f}" for m, r in task.items()))

    log("[4/4] forget-vector arithmetic: learned compositions of the class vectors vs directly trained vectors")
    bank_names = VectorBank.load(out / "bank").names if VectorBank.exists(out / "bank") else []
    basis_names = [f"forget-{c}" for c in classes if f"forget-{c}" in bank_names]  # this call's or an earlier one's
    arithmetic: dict[str, Any] = report.get("arithmetic", {})
    arith_tasks = []
    if "arithmetic" in stages:  # (the default tasks name classes a small data set may not have)
        arith_tasks = [
            (f"classes {a.pair}", ForgetSpec(classes=tuple(int(c) for c in a.pair.split(",")))),
            (f"classes {a.triple}", ForgetSpec(classes=tuple(int(c) for c in a.triple.split(",")))),
        ]
        if a.mixed:
            arith_tasks.append((f"mixed {a.mixed}", _mixed_spec(ds, held_out, a.mixed, seed=1)))
    if "arithmetic" in stages and len(basis_names) < 2:
        stage = f"arithmetic (basis of {len(basis_names)} class vector{'s' if len(basis_names) != 1 else ''}; needs 2)"
        log(f"  skipped {stage}")
        report["skipped"].append(stage)
        arith_tasks = []
    # both compositions start from the arithmetic's guess (the target classes' vectors at 1), so a tenth of
    # the vector's steps is the budget: the bar is 1/10 of a direct vector's training time
    compose_recipe = composition_recipe(recipe, "learn")
    refine_recipe = composition_recipe(recipe, "refine")
    report["compose_recipe"] = compose_recipe.to_dict()
    report["refine_recipe"] = refine_recipe.to_dict()
    for i, (task, spec) in enumerate(arith_tasks):
        if not fits(f"arithmetic: {task}", 1.3 * vector_s, "arithmetic"):
            continue
        t0 = time.perf_counter()
        direct = wf.train_vector(
            model_dir,
            ds,
            out / "bank",
            {f"direct-{i}": spec},
            recipe,
            device=a.device,
            evaluate_after=False,
            overwrite=True,
        )
        d = wf.evaluate_result(model_dir, ds, bank_dir=out / "bank", vector=f"direct-{i}", forget=spec, **ev)
        keep = (*KEYS, "TA_drop")
        rows = {
            "direct vector": {
                **{k: d[k] for k in keep},
                "parameters": int(np.prod(ds.shape)),
                "seconds": direct[0]["seconds"],
                "train_seconds": direct[0]["train_seconds"],
            }
        }
        # refine starts from the target classes' vectors: class targets only
        for method in ("learn", "refine") if spec.classes is not None else ("learn",):
            label = {"learn": "learned", "refine": "refined"}[method]
            res = wf.compose_learned(
                out / "bank",
                f"{label}-{i}",
                model_dir,
                ds,
                spec,
                compose_recipe if method == "learn" else refine_recipe,
                basis=basis_names,
                device=a.device,
                evaluate_after=False,
                overwrite=True,
                method=method,
            )
            m = wf.evaluate_result(model_dir, ds, bank_dir=out / "bank", vector=f"{label}-{i}", forget=spec, **ev)
            rows[f"{label} composition"] = {
                **{k: m[k] for k in keep},
                "parameters": len(basis_names) if method == "learn" else int(np.prod(ds.shape)),
                "seconds": res["seconds"],
                "train_seconds": res["train_seconds"],
                "train_share": res["train_seconds"] / max(direct[0]["train_seconds"], 1e-9),
                **({"coefficients": res["coefficients"]} if method == "learn" else {}),
                **({"UA_per_class": m["UA_per_class"]} if "UA_per_class" in m else {}),
            }
        arithmetic[task] = rows
        report["arithmetic"] = arithmetic
        save()
        budget.timed["arithmetic"] = time.perf_counter() - t0
        cells = (f"{k} UA {r['UA']:.1f} TA {r['TA']:.1f} ({r['seconds']:.1f}s)" for k, r in rows.items())
        log(f"  {task}: " + " | ".join(cells))
    report["complete"] = not report["skipped"]
    save()
    log(
        f"report: {out / 'report.md'} "
        f"({report['total_seconds']:.0f}s){'; skipped: ' + ', '.join(report['skipped']) if report['skipped'] else ''}"
    )
    return 0


def run_baselines(
    name: str, spec: ForgetSpec, ds, model_dir: Path, out: Path, ev: dict, methods: tuple[str, ...] = METHODS
) -> dict[str, dict]:
    """Retrain, FT, GA and RL (or ``methods``) on one forget task: method -> metrics with seconds."""
    res: dict[str, dict] = {}
    for m in methods:
        rec = wf.unlearn_baseline(m, model_dir, ds, spec, out / f"{name}-{m}", device=ev["device"])
        r = wf.evaluate_result(out / f"{name}-{m}", ds, forget=spec, **ev)
        r["seconds"] = rec["unlearning"]["seconds"]
        res[m] = r
    return res


def _write_md(report: dict[str, Any], path: Path, argv: list[str] | None) -> None:
    a, env, orig = report["config"], report["env"], report.get("original", {})
    nan = float("nan")
    md = [
        f"# Unlearning report: {a['arch']} on {a['data']} ({env.get('device_name', a['device'])}, {env['date']})",
        "",
        f"Original model: train {orig.get('train_acc', nan):.2f}%, held-out {orig.get('val_acc', nan):.2f}%, "
        f"test {orig.get('test_acc', nan):.2f}% ({orig.get('epochs', '?')} epochs in "
        f"{orig.get('train_seconds', nan):.1f} s, {a['val_fraction']:.0%} of the training set held out). "
        f"Forget-vector recipe: preset `{a['preset']}` (class-wise), `{a['random_preset']}` (random)"
        f"{', ' + str(a['vector_epochs']) + ' epochs' if a['vector_epochs'] else ''}. "
        f"MIA fit on at most {a['mia_max_per_side']} members and non-members.",
        f"Command: `python benchmarks/unlearning_report.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
    ]
    if not report["complete"]:
        md += [f"**Incomplete**: skipped {', '.join(report['skipped']) or 'nothing yet (still running)'}.", ""]
    cw = report.get("class_wise")
    if cw:
        w = cw["worst"]
        md += [
            f"## Class-wise forgetting (classes {cw['classes']}; mean ± std over the classes each row ran on)",
            "",
            *_md_table(cw["mean_std"], True),
            "",
            f"Forget vector, worst class: UA {w['UA']:.2f}, MIA-Efficacy {w['MIA_efficacy']:.2f}, TA drop "
            f"{w['TA_drop']:.2f} points (TA drop: the original model's accuracy on the remaining classes' test images "
            "minus the vector's). Per class TA drop: "
            + ", ".join(f"{t['forget vector']['TA_drop']:.2f}" for t in cw["per_class"])
            + f". Avg.Gap rows are against Retrain on classes {cw['baseline_classes']} only.",
            "",
        ]
    for name, task in (report.get("random") or {}).items():
        md += [f"## {name.capitalize()} data-wise forgetting (seed 1)", "", *_md_table(task, False), ""]
    if report.get("arithmetic"):
        md += [
            "## Forget-vector arithmetic",
            "",
            "| task | method | UA | RA | TA | TA drop | MIA-Efficacy | parameters learned | time (s) | training (s) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for task, rows in report["arithmetic"].items():
            for m, r in rows.items():
                md.append(
                    f"| {task} | {m} | {r['UA']:.2f} | {r['RA']:.2f} | {r['TA']:.2f} | {r['TA_drop']:.2f} "
                    f"| {r['MIA_efficacy']:.2f} | {r['parameters']} | {r['seconds']:.2f} "
                    f"| {r.get('train_seconds', nan):.2f} |"
                )
        md += [
            "",
            "The learned compositions combine the class-wise vectors of the first table (their training time is not "
            "counted again), starting from coefficient 1 for the target classes' vectors, with a tenth of the vector "
            "recipe's training steps. The refined compositions (`compose --refine`, class targets only) start from the "
            "sum of the target classes' vectors and train the whole vector for a tenth of the steps, in two or more "
            "epochs at γ 0.3: a vector of its own, not a combination. Time is training plus the strength "
            "calibration on validation data; training is also shown alone (the budget is a tenth of it).",
        ]
    md += ["", "![UA vs TA](tradeoff.png)"]
    path.write_text("\n".join(md) + "\n")


def _plot(class_tasks: list[dict], rand_tasks: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("class-wise", class_tasks)] + [(n, [t]) for n, t in rand_tasks.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, tasks) in zip(axes[0], panels):
        methods = list(dict.fromkeys(m for t in tasks for m in t))
        for i, m in enumerate(methods):
            rows = [t[m] for t in tasks if m in t]
            ax.scatter(
                [r["TA"] for r in rows],
                [r["UA"] for r in rows],
                label=m,
                marker="*" if m == "forget vector" else "o",
                s=90 if m == "forget vector" else 40,
                color=f"C{i}",
            )
        ax.set(xlabel="TA (%)", ylabel="UA (%)", title=f"UA vs TA, {title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
