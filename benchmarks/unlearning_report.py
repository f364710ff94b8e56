#!/usr/bin/env python
"""The paper-style comparison: forget vectors vs model-based unlearning (Retrain, FT, GA, RL).

Tables (UA, RA, TA, MIA-Efficacy, Avg.Gap vs Retrain, wall time; percent):
1. class-wise forgetting, averaged over several classes (mean ± std);
2. random data-wise forgetting (a seeded 10% of the training set);
3. forget-vector arithmetic: a learned composition of the class-wise vectors vs a directly trained
   vector, for a 2-class task and for the random subset (metrics, parameters learned, time).
Every method uses the same data splits, the same metrics code and the same Retrain reference.
Writes ``report.md``, ``report.json`` and ``tradeoff.png`` (UA vs TA) under ``--out``.

Digits on CPU (minutes)::

    python benchmarks/unlearning_report.py --out runs/report-digits

CIFAR-10 on a GPU::

    python benchmarks/unlearning_report.py --data cifar10:../shared/datasets/cifar10/cifar10-jpeg.tar.gz \\
        --arch resnet18-cifar --preset paper --classes 0,3,5 --out runs/report-cifar
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

from forgetrt.runtime.files import atomic_write_json
from forgetrt.train import workflows as wf
from forgetrt.train.data import ForgetSpec, load_data
from forgetrt.train.recipes import PRESETS

KEYS = ("UA", "RA", "TA", "MIA_efficacy")
METHODS = ("retrain", "ft", "ga", "rl")


def _gap(r: dict, ref: dict) -> float:
    return float(np.mean([abs(r[k] - ref[k]) for k in KEYS]))


def run_task(
    name: str, spec: ForgetSpec, ds, model_dir: Path, out: Path, recipe, device: str, log, mia: int | None
) -> dict[str, dict]:
    """Every method on one forget task; returns method -> metrics (with avg_gap vs retrain and seconds)."""
    res: dict[str, dict] = {}
    ev = {"device": device, "mia_max_per_side": mia}
    for m in METHODS:
        rec = wf.unlearn_baseline(m, model_dir, ds, spec, out / f"{name}-{m}", device=device)
        r = wf.evaluate_result(out / f"{name}-{m}", ds, forget=spec, **ev)
        r["seconds"] = rec["unlearning"]["seconds"]
        res[m] = r
    t0 = time.perf_counter()
    vec = wf.train_vector(
        model_dir, ds, out / "bank", {f"fv-{name}": spec}, recipe, device=device, evaluate_after=False, overwrite=True
    )
    fv = wf.evaluate_result(model_dir, ds, bank_dir=out / "bank", vector=f"fv-{name}", forget=spec, **ev)
    fv["seconds"] = vec[0]["seconds"]
    fv["wall_seconds"] = time.perf_counter() - t0
    res["forget vector"] = fv
    for r in res.values():
        r["avg_gap"] = _gap(r, res["retrain"])
    log(
        f"  {name}: "
        + ", ".join(f"{m} UA {r['UA']:.1f} TA {r['TA']:.1f} gap {r['avg_gap']:.2f}" for m, r in res.items())
    )
    return res


def _mean_std(tasks: list[dict[str, dict]]) -> dict[str, dict[str, tuple[float, float]]]:
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for m in tasks[0]:
        out[m] = {}
        for k in (*KEYS, "avg_gap", "seconds"):
            v = np.array([t[m][k] for t in tasks], float)
            out[m][k] = (float(v.mean()), float(v.std()))
    return out


def _md_table(rows: dict[str, dict[str, Any]], with_std: bool) -> list[str]:
    head = "| method | UA | RA | TA | MIA-Efficacy | Avg.Gap vs Retrain | time (s) |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for m, r in rows.items():

        def cell(k: str) -> str:
            v = r[k]
            return f"{v[0]:.2f} ± {v[1]:.2f}" if with_std else f"{v:.2f}"

        lines.append(f"| {m} | " + " | ".join(cell(k) for k in (*KEYS, "avg_gap", "seconds")) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits")
    p.add_argument("--arch", default="digits-cnn")
    p.add_argument("--classes", default="0,3,7", help="classes for the class-wise table")
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--pair", default="0,3", help="2-class task for the arithmetic table")
    p.add_argument(
        "--basis",
        default="all",
        choices=["all", "tasks"],
        help="arithmetic basis: all class vectors (trained together) or the class-wise tasks' vectors "
        "(no extra training)",
    )
    p.add_argument("--preset", default="digits", choices=sorted(PRESETS))
    p.add_argument(
        "--random-preset",
        default="paper",
        choices=sorted(PRESETS),
        help="recipe for the random data-wise task (the class-wise tuned 'digits' preset over-forgets random data)",
    )
    p.add_argument("--vector-epochs", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None, help="classifier (and so Retrain) epochs")
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
    p.add_argument("--subset", default=None, help="N_TRAIN,N_TEST seeded random subset (smoke runs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/unlearning-report")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    ds = load_data(a.data)
    if a.subset:
        ntr, nte = (int(x) for x in a.subset.split(","))
        ds = ds.subset(ntr, nte, seed=0)
    report_data_s = time.perf_counter() - t_start
    recipe = PRESETS[a.preset] if a.vector_epochs is None else replace(PRESETS[a.preset], epochs=a.vector_epochs)
    rand_recipe = (
        PRESETS[a.random_preset]
        if a.vector_epochs is None
        else replace(PRESETS[a.random_preset], epochs=a.vector_epochs)
    )
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

    def save() -> None:
        report["total_seconds"] = time.perf_counter() - t_start
        atomic_write_json(out / "report.json", report)
        _write_md(report, out / "report.md", argv)
        if report.get("class_wise", {}).get("per_class") or report.get("random"):
            _plot(report.get("class_wise", {}).get("per_class", []), report.get("random"), out / "tradeoff.png")

    def fits(stage: str, estimate: float) -> bool:
        if a.time_budget is None:
            return True
        left = a.time_budget - (time.perf_counter() - t_start)
        if estimate <= left:
            return True
        log(f"  skipped {stage}: about {estimate:.0f}s needed, {left:.0f}s left of the budget")
        report["skipped"].append(stage)
        return False

    log(f"[1/4] original {a.arch} on {a.data}")
    rec = wf.train_model(a.arch, ds, out / "model", epochs=a.epochs, device=a.device)
    model_dir = out / "model"
    report["original"] = {**rec["metrics"], "train_seconds": rec["training"]["seconds"]}
    save()

    classes = [int(c) for c in a.classes.split(",")]
    log(f"[2/4] class-wise forgetting, classes {classes}")
    class_tasks: list[dict] = []
    task_s = 2.5 * rec["training"]["seconds"]  # before the first task: Retrain + FT + RL + vector, roughly
    for c in classes:
        if not fits(f"class {c}", task_s):
            continue
        t0 = time.perf_counter()
        task = run_task(
            f"class{c}", ForgetSpec(classes=(c,)), ds, model_dir, out, recipe, a.device, log, a.mia_max_per_side
        )
        task_s = time.perf_counter() - t0
        fv = task["forget vector"]
        base = wf.evaluate_result(
            model_dir, ds, forget=ForgetSpec(classes=(c,)), device=a.device, mia_max_per_side=a.mia_max_per_side
        )
        fv["TA_drop"] = base["TA"] - fv["TA"]  # both on the remaining classes' test images
        class_tasks.append(task)
        report["class_wise"] = {
            "classes": classes[: len(class_tasks)],
            "per_class": class_tasks,
            "mean_std": _mean_std(class_tasks),
        }
        save()

    log(f"[3/4] random {a.fraction:.0%} data-wise forgetting")
    rand_spec = ForgetSpec(fraction=a.fraction, seed=1)
    if fits("random", task_s):
        report["random"] = run_task(
            "random", rand_spec, ds, model_dir, out, rand_recipe, a.device, log, a.mia_max_per_side
        )
        save()

    log("[4/4] forget-vector arithmetic: learned composition of class vectors vs a directly trained vector")
    pair = tuple(int(c) for c in a.pair.split(","))
    ev = {"device": a.device, "mia_max_per_side": a.mia_max_per_side}
    arithmetic: dict[str, Any] = {}
    if a.basis == "tasks":
        basis_names = [f"fv-class{c}" for c in classes[: len(class_tasks)]]
        basis_s = sum(t["forget vector"]["seconds"] for t in class_tasks)
    elif fits("arithmetic basis (all class vectors)", 0.4 * task_s * ds.num_classes):
        t0 = time.perf_counter()
        basis = wf.train_class_vectors(
            model_dir, ds, out / "bank", recipe=recipe, device=a.device, evaluate_after=False, overwrite=True
        )
        basis_s = time.perf_counter() - t0
        basis_names = [b["name"] for b in basis]
    else:
        basis_names, basis_s = [], 0.0
    report["arithmetic_basis"] = {"vectors": basis_names, "seconds": basis_s}
    tasks = [(f"classes {pair}", ForgetSpec(classes=pair), recipe, None)]
    if report.get("random"):
        tasks.append((f"random {a.fraction:.0%}", rand_spec, rand_recipe, report["random"]["retrain"]))
    if len(basis_names) < 2:  # nothing to compose: say so (it is not a budget skip only)
        stage = f"arithmetic (basis of {len(basis_names)} class vector{'s' if len(basis_names) != 1 else ''}; needs 2)"
        log(f"  skipped {stage}")
        report["skipped"].append(stage)
        tasks = []
    for task, spec, r_, ref in tasks:
        if not fits(f"arithmetic: {task}", 0.5 * task_s):
            continue
        key = "pair" if task.startswith("classes") else "rand"
        direct = wf.train_vector(
            model_dir,
            ds,
            out / "bank",
            {f"direct-{key}": spec},
            r_,
            device=a.device,
            evaluate_after=False,
            overwrite=True,
        )
        d = wf.evaluate_result(model_dir, ds, bank_dir=out / "bank", vector=f"direct-{key}", forget=spec, **ev)
        learned = wf.compose_learned(
            out / "bank",
            f"learned-{key}",
            model_dir,
            ds,
            spec,
            r_,
            basis=basis_names,
            device=a.device,
            evaluate_after=False,
            overwrite=True,
        )
        lm = wf.evaluate_result(model_dir, ds, bank_dir=out / "bank", vector=f"learned-{key}", forget=spec, **ev)
        arithmetic[task] = {
            "direct vector": {
                **{k: d[k] for k in KEYS},
                "parameters": int(np.prod(ds.shape)),
                "seconds": direct[0]["seconds"],
                **({"avg_gap": _gap(d, ref)} if ref else {}),
            },
            "learned composition": {
                **{k: lm[k] for k in KEYS},
                "parameters": len(basis_names),
                "seconds": learned["seconds"],
                **({"avg_gap": _gap(lm, ref)} if ref else {}),
                "coefficients": learned["coefficients"],
            },
        }
        if "UA_per_class" in lm:
            arithmetic[task]["learned composition"]["UA_per_class"] = lm["UA_per_class"]
        report["arithmetic"] = arithmetic
        save()
        log(f"  {task}: direct UA {d['UA']:.1f} TA {d['TA']:.1f} | learned UA {lm['UA']:.1f} TA {lm['TA']:.1f}")
    report["complete"] = not report["skipped"]
    save()
    log(
        f"report: {out / 'report.md'} "
        f"({report['total_seconds']:.0f}s){'; skipped: ' + ', '.join(report['skipped']) if report['skipped'] else ''}"
    )
    return 0


def _write_md(report: dict[str, Any], path: Path, argv: list[str] | None) -> None:
    a, env, orig = report["config"], report["env"], report.get("original", {})
    md = [
        f"# Unlearning report: {a['arch']} on {a['data']} ({env.get('device_name', a['device'])}, {env['date']})",
        "",
        f"Original model: train {orig.get('train_acc', float('nan')):.2f}%, test "
        f"{orig.get('test_acc', float('nan')):.2f}% "
        f"(trained in {orig.get('train_seconds', float('nan')):.1f} s). Forget-vector recipe: preset `{a['preset']}` "
        "(class-wise), "
        f"`{a['random_preset']}` (random){', ' + str(a['vector_epochs']) + ' epochs' if a['vector_epochs'] else ''}. "
        f"MIA fit on at most {a['mia_max_per_side']} members and non-members.",
        f"Command: `python benchmarks/unlearning_report.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
    ]
    if not report["complete"]:
        md += [f"**Incomplete**: skipped {', '.join(report['skipped']) or 'nothing yet (still running)'}.", ""]
    cw = report.get("class_wise")
    if cw:
        md += [
            f"## Class-wise forgetting (classes {cw['classes']}; mean ± std)",
            "",
            *_md_table(cw["mean_std"], True),
            "",
        ]
        drops = [t["forget vector"]["TA_drop"] for t in cw["per_class"]]
        md += [
            "Forget vector TA drop vs the original model (remaining classes' test images): "
            f"{', '.join(f'{d:.2f}' for d in drops)} points.",
            "",
        ]
    if report.get("random"):
        md += [
            f"## Random {a['fraction']:.0%} data-wise forgetting (seed 1)",
            "",
            *_md_table(report["random"], False),
            "",
        ]
    if report.get("arithmetic"):
        md += [
            "## Forget-vector arithmetic",
            "",
            "| task | method | UA | RA | TA | MIA-Efficacy | Avg.Gap | parameters learned | time (s) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for task, rows in report["arithmetic"].items():
            for m, r in rows.items():
                gap = f"{r['avg_gap']:.2f}" if "avg_gap" in r else "-"
                md.append(
                    f"| {task} | {m} | {r['UA']:.2f} | {r['RA']:.2f} | {r['TA']:.2f} | {r['MIA_efficacy']:.2f} | {gap} "
                    f"| {r['parameters']} | {r['seconds']:.2f} |"
                )
        b = report["arithmetic_basis"]
        md += [
            "",
            f"The learned compositions reuse {len(b['vectors'])} class-wise vectors ({', '.join(b['vectors'])}; "
            f"trained in {b['seconds']:.1f} s).",
            "Avg.Gap is against Retrain on the same forget set (for the 2-class task no Retrain was run, so it is "
            "left out).",
        ]
    md += ["", "![UA vs TA](tradeoff.png)"]
    path.write_text("\n".join(md) + "\n")


def _plot(class_tasks: list[dict], rand_task: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, tasks, title in (
        (axes[0], class_tasks, "class-wise"),
        (axes[1], [rand_task] if rand_task else [], "random data-wise"),
    ):
        if not tasks:
            ax.set_axis_off()
            continue
        for i, m in enumerate(tasks[0]):
            ax.scatter(
                [t[m]["TA"] for t in tasks],
                [t[m]["UA"] for t in tasks],
                label=m,
                marker="*" if m == "forget vector" else "o",
                s=90 if m == "forget vector" else 40,
                color=f"C{i}",
            )
        ax.set(xlabel="TA (%)", ylabel="UA (%)", title=f"UA vs TA, {title}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
