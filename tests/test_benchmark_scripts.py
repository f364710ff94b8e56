"""The benchmark scripts run end to end on tiny settings (their real runs are documented in RESULTS.md)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_unlearning_report_small(tmp_path):
    out = tmp_path / "rep"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "unlearning_report.py"),
            *("--classes", "0,3,5", "--baseline-classes", "0", "--fractions", "0.1"),
            *("--epochs", "3", "--vector-epochs", "2", "--preset", "digits:distill=2", "--out", str(out)),
        ],
        capture_output=True,
        text=True,
        env=(env := {"TQDM_DISABLE": "1", **__import__("os").environ}),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["complete"] and rep["original"]["val_acc"] > 0
    assert rep["recipe"]["distill"] == 2.0 and rep["recipe"]["epochs"] == 2
    rand = rep["random"]["random 0.1"]
    assert set(rand) == {"retrain", "ft", "ga", "rl", "no vector", "vector, as trained", "forget vector"}
    assert rand["retrain"]["avg_gap"] == 0.0 and rand["vector, as trained"]["strength"] == 1.0
    cw = rep["class_wise"]
    assert cw["classes"] == [0, 3, 5] and set(cw["per_class"][0]) == {
        "no vector",
        "output mask",
        "forget vector",
        "retrain",
        "ft",
        "ga",
        "rl",
    }
    assert set(cw["per_class"][1]) == {"no vector", "output mask", "forget vector"}  # baselines on class 0 only
    mask = cw["per_class"][0]["output mask"]
    assert mask["UA"] == 100.0 and mask["MIA_efficacy"] == 100.0  # the forgotten class is never predicted
    assert set(cw["worst"]) == {"UA", "MIA_efficacy", "TA_drop"}
    for row in cw["mean_std"].values():
        for _mean, std in row.values():
            assert std >= 0
    ar = rep["arithmetic"]
    assert set(ar) == {"classes 0,3", "classes 0,3,5", "mixed 3=0.5,7=0.1"}
    assert ar["classes 0,3"]["learned composition"]["parameters"] == 3  # the basis: the three class vectors
    assert ar["classes 0,3"]["refined composition"]["parameters"] == 64  # a whole 8x8 vector
    assert "refined composition" not in ar["mixed 3=0.5,7=0.1"]  # no class vectors to start from
    assert rep["compose_recipe"]["epochs"] == 1 and rep["refine_recipe"]["gamma"] == 0.3
    text = (out / "report.md").read_text()
    assert "Class-wise forgetting" in text and "Forget-vector arithmetic" in text and "output mask" in text
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"

    # the arithmetic probe runs on the report's model and class vectors
    probe = tmp_path / "probe.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "arithmetic_probe.py"), "--report", str(out)]
    cmd += ["--preset", "digits:distill=2,epochs=2", "--tasks", "0,3;3,5", "--json", str(probe)]
    variants = ["--variant", "slow=all:lr_scale=0.1", "--variant", "warm=refine:gamma=0.5"]
    r = subprocess.run([*cmd, *variants], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(probe.read_text())
    assert set(res["summary"]) == {"direct vector", "plain sum", "slow", "warm"}
    assert res["summary"]["direct vector"]["TA_below_direct_mean"] == 0.0
    assert res["summary"]["direct vector"]["targets_within_2"] == 2
    assert res["per_task"]["warm"]["0,3"]["coefficients"] is None  # a refined sum is a vector of its own
    assert set(res["per_task"]["slow"]) == {"0,3", "3,5"}
    assert set(res["per_task"]["slow"]["0,3"]["coefficients"]) == {"forget-0", "forget-3", "forget-5"}
    missing = [*cmd[:-4], "--tasks", "0,7", "--json", str(probe)]
    missing = subprocess.run(missing, capture_output=True, text=True, env=env)
    assert missing.returncode != 0 and "no class vector for classes [7]" in missing.stderr
    bad = subprocess.run([*cmd, "--variant", "x=everything"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "bad --variant 'x=everything'" in bad.stderr


def test_unlearning_report_time_budget_skips_and_says_so(tmp_path):
    out = tmp_path / "rep"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "unlearning_report.py"),
            *("--classes", "0,3", "--fractions", "0.1", "--epochs", "2"),
            *("--time-budget", "0.001", "--out", str(out)),
        ],
        capture_output=True,
        text=True,
        env={"TQDM_DISABLE": "1", **__import__("os").environ},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((out / "report.json").read_text())
    skipped = ["class-wise vectors", "random 0.1", "arithmetic (basis of 0 class vectors; needs 2)"]
    assert rep["complete"] is False and rep["skipped"] == skipped
    assert rep["original"]["test_acc"] > 50 and "class_wise" not in rep and "arithmetic" not in rep
    assert f"**Incomplete**: skipped {', '.join(skipped)}" in (out / "report.md").read_text()


def test_report_budget_learns_from_the_last_task_of_a_kind(monkeypatch):
    """A stage's estimate is the larger of its formula and what the last task of its kind took: the CPU
    smoke run of the quality suite ran into the suite's timeout because the formulas (multiples of the base
    model's training time) were far too small where evaluation dominates."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("unlearning_report", REPO / "benchmarks" / "unlearning_report.py")
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    now = [0.0]
    lines, skipped = [], []
    b = mod.Budget(100.0, 0.0, lines.append, skipped, clock=lambda: now[0])
    assert b.fits("random 0.01", 10.0, "random")
    now[0] = 60.0  # the first random task took 60 s; 40 s are left
    b.timed["random"] = 60.0
    assert b.fits("arithmetic: classes 0,3", 10.0, "arithmetic")  # another kind: its formula alone
    assert not b.fits("random 0.1", 10.0, "random")  # 10 s by the formula, 60 s as measured
    assert skipped == ["random 0.1"] and "about 60s needed, 40s left" in lines[-1]
    assert mod.Budget(None, 0.0, lines.append, skipped).fits("anything", 1e9)


def test_vector_sweep_small(tmp_path):
    from forgetrt.train.workflows import train_model

    train_model("digits-cnn", "digits", tmp_path / "m", epochs=3, device="cpu")
    script = str(REPO / "benchmarks" / "vector_sweep.py")
    env = {"TQDM_DISABLE": "1", **__import__("os").environ}
    args = [
        sys.executable,
        script,
        "--model",
        str(tmp_path / "m"),
        "--data",
        "digits",
        "--classes",
        "3",
        "--device",
        "cpu",
        "--bank",
        str(tmp_path / "bank"),
        "--json",
        str(tmp_path / "s.json"),
    ]
    r = subprocess.run(
        [*args, "--recipe", "a=paper:epochs=1,lr=0.05", "--recipe", "b=digits:epochs=1,alpha=16,augment=shift"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((tmp_path / "s.json").read_text())
    assert out["task"]["classes"] == [3] and list(out["results"]) == ["a", "b"]
    assert out["results"]["a"]["recipe"]["lr"] == 0.05 and out["results"]["b"]["recipe"]["alpha"] == 16.0
    assert out["results"]["b"]["recipe"]["augment"] == "shift" and out["results"]["a"]["recipe"]["epochs"] == 1
    for row in out["results"].values():
        assert 0 <= row["UA"] <= 100 and 0 <= row["TA"] <= 100 and row["seconds"] > 0
    bad = subprocess.run([*args, "--recipe", "x=paper:wings=2"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "'wings=2' is not key=value" in bad.stderr


def _run_script(name, *args):
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / name), *map(str, args)],
        capture_output=True,
        text=True,
        env={"TQDM_DISABLE": "1", **__import__("os").environ},
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def test_runtime_overhead_small(tmp_path):
    _run_script(
        "runtime_overhead.py",
        "--arch",
        "digits-cnn",
        "--runs",
        "30",
        "--warmup",
        "3",
        "--seconds",
        "0.3",
        "--rounds",
        "2",
        "--threads",
        "8",
        "--json",
        tmp_path / "ro.json",
    )
    res = json.loads((tmp_path / "ro.json").read_text())["results"][0]
    assert res["a_infer_vs_bare_batch1"]["runtime"]["p50_ms"] > 0 and res["b_hetero_vs_homo_batch64"]["ratio"] > 0
    c = res["c_concurrent_vs_serial"]
    assert (
        c["rounds"] == 2
        and len(c["per_round"]["serial"]) == 2
        and c["batcher"] == {"max_batch_size": 32, "max_queue_delay_us": 0}
    )
    assert c["async_submitters_req_per_s"] > 0 and 1 <= c["async_mean_batch_images"] <= 8


def test_gpu_latency_cpu_smoke(tmp_path):
    """Without CUDA the latency script runs the eager path and the server end to end (a smoke run)."""
    _run_script(
        "gpu_latency.py",
        "--synthetic",
        "digits-cnn",
        "--runs",
        "20",
        "--warmup",
        "2",
        "--batches",
        "1,4",
        "--json",
        tmp_path / "g.json",
    )
    res = json.loads((tmp_path / "g.json").read_text())
    modes = ["torch eager (as trained)", "torch eager"]
    assert [(p["mode"], p["batch"]) for p in res["points"]] == [(m, b) for b in (1, 4) for m in modes]
    assert (
        res["backends"]["torch eager"]["fuse"] == "bn" and res["backends"]["torch eager (as trained)"]["fuse"] == "none"
    )
    assert all(p["rel_diff_vs_eager"] < 1e-5 for p in res["points"])  # the folded module computes the same logits
    assert res["server_end_to_end_b1"]["p50_ms"] > 0 and res["server_end_to_end_b1"]["client"] == "tritonclient.http"


def test_byo_224_cpu_smoke(tmp_path):
    out = tmp_path / "byo.json"
    _run_script(
        "byo_224.py",
        *("--arch", "cifar-small", "--size", 32, "--ks", "1,3", "--batches", "1,2", "--runs", 5, "--warmup", 1),
        *("--train-images", 64, "--bank-k", 20, "--json", out),
    )
    rep = json.loads(out.read_text())
    assert rep["vector_values"] == 3 * 32 * 32 and set(rep["training"]) == {"1 vectors", "10 vectors"}
    modes = {(r["mode"], r["k"], r["batch"]) for r in rep["latency"]}
    assert ("bare classifier, torch eager", 0, 2) in modes and ("onnxruntime", 3, 1) in modes
    assert ("torch eager", 1, 2) in modes
    assert rep["bank_block"]["bytes"] == 20 * 3 * 32 * 32 * 4


def test_unlearning_report_on_a_resized_imagefolder(tmp_path, monkeypatch):
    """The report on any ImageFolder at another size (issue 15's demonstration runs CIFAR-10 at 224 this way)."""
    sys.path.insert(0, str(REPO / "tests"))
    from imagefolder_data import make_imagefolder

    monkeypatch.setenv("FORGETRT_CACHE_DIR", str(tmp_path / "cache"))
    root = make_imagefolder(tmp_path / "if", n_train=10, n_test=4)
    out = tmp_path / "rep"
    _run_script(
        "unlearning_report.py",
        *("--data", f"imagefolder:{root}", "--image-size", 32, "--arch", "cifar-small", "--epochs", 2),
        *("--vector-epochs", 1, "--preset", "paper", "--classes", "0,1", "--baseline-classes", "0"),
        *("--stages", "class", "--out", out),
    )
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["image_size"] == 32 and rep["class_wise"]["classes"] == [0, 1]
    assert set(rep["class_wise"]["per_class"][0]) >= {"retrain", "rl", "forget vector"}


def test_request_breakdown_small(tmp_path, digits_bundle):
    out = tmp_path / "rb.json"
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "request_breakdown.py"), "--bundle", str(digits_bundle)]
        + ["--runs", "30", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["median_us"]
    assert len(rows) == 9 and all(v > 0 for v in rows.values())
    hop = next(v for k, v in rows.items() if k.startswith("front-end hop"))
    assert hop > rows["Runtime.infer (direct)"]  # a round trip to another process costs more than the call


def test_engine_hub_small(tmp_path, digits_bundle):
    out = tmp_path / "hub.json"
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "engine_hub.py"), "--bundle", str(digits_bundle)]
        + ["--outstanding", "1,8", "--duration", "0.5", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["outstanding_per_client"] for row in rows] == [1, 8]
    assert all(row["requests_per_s"] > 0 and row["engine_cpu_us_per_request"] > 0 for row in rows)


def test_classwise_sweep_small(tmp_path, digits_model_dir):
    out = tmp_path / "cw.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "classwise_sweep.py"), "--model", str(digits_model_dir)]
    cmd += ["--classes", "0,1", "--device", "cpu", "--json", str(out)]
    cmd += ["--recipe", "a=digits:epochs=1", "--recipe", "b=digits:epochs=1,alpha=1,distill=2"]
    env = {"TQDM_DISABLE": "1", **__import__("os").environ}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["runs"]) == {"a", "b"}
    run = res["runs"]["a"][str(digits_model_dir)]
    assert set(run["per_class"]) == {"forget-0", "forget-1"}
    assert {"val_drop_mean", "test_TA_drop_worst", "all_reached"} <= set(run["summary"])
    scores = res["choice"]["validation_drop_by_recipe"]
    eligible = [n for n, r in res["runs"].items() if r[str(digits_model_dir)]["summary"]["all_reached"]]
    assert set(scores) == set(eligible)
    if scores:  # the rule: the lowest mean validation drop among the eligible
        assert res["choice"]["chosen"] == min(scores, key=scores.get)
    bad = subprocess.run([*cmd[:-4], "--recipe", "x=paper:wings=2"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "wings" in bad.stderr
    bad = subprocess.run([*cmd, "--subset", "10000"], capture_output=True, text=True, env=env)  # a usage error
    assert bad.returncode == 2 and "bad subset '10000'" in bad.stderr and "Traceback" not in bad.stderr
