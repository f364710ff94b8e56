"""The benchmark scripts run end to end on tiny settings (their real runs are documented in RESULTS.md)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_unlearning_report_small(tmp_path):
    out = tmp_path / "rep"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "unlearning_report.py"), "--classes", "0", "--epochs", "3", "--vector-epochs", "2", "--out", str(out)],
                       capture_output=True, text=True, env={"TQDM_DISABLE": "1", **__import__("os").environ})
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["random"]) == {"retrain", "ft", "ga", "rl", "forget vector"}
    assert rep["random"]["retrain"]["avg_gap"] == 0.0
    for m, row in rep["class_wise"]["mean_std"].items():
        for k in ("UA", "RA", "TA", "MIA_efficacy", "avg_gap", "seconds"):
            mean, std = row[k]
            assert std >= 0
    assert rep["arithmetic"]["classes (0, 3)"]["learned composition"]["parameters"] == 10
    text = (out / "report.md").read_text()
    assert "Class-wise forgetting" in text and "Forget-vector arithmetic" in text
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"


def test_unlearning_report_time_budget_skips_and_says_so(tmp_path):
    out = tmp_path / "rep"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "unlearning_report.py"), "--classes", "0,3", "--epochs", "2", "--basis", "tasks",
                        "--time-budget", "0.001", "--out", str(out)],
                       capture_output=True, text=True, env={"TQDM_DISABLE": "1", **__import__("os").environ})
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["complete"] is False and rep["skipped"] == ["class 0", "class 3", "random"]
    assert rep["original"]["test_acc"] > 50 and "class_wise" not in rep and "arithmetic" not in rep
    assert "**Incomplete**: skipped class 0, class 3, random" in (out / "report.md").read_text()


def test_vector_sweep_small(tmp_path):
    from forgetrt.train.workflows import train_model

    train_model("digits-cnn", "digits", tmp_path / "m", epochs=3, device="cpu")
    script = str(REPO / "benchmarks" / "vector_sweep.py")
    env = {"TQDM_DISABLE": "1", **__import__("os").environ}
    args = [sys.executable, script, "--model", str(tmp_path / "m"), "--data", "digits", "--classes", "3", "--device", "cpu",
            "--bank", str(tmp_path / "bank"), "--json", str(tmp_path / "s.json")]
    r = subprocess.run([*args, "--recipe", "a=paper:epochs=1,lr=0.05", "--recipe", "b=digits:epochs=1,alpha=16,augment=shift"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((tmp_path / "s.json").read_text())
    assert out["task"]["classes"] == [3] and list(out["results"]) == ["a", "b"]
    assert out["results"]["a"]["recipe"]["lr"] == 0.05 and out["results"]["b"]["recipe"]["alpha"] == 16.0
    assert out["results"]["b"]["recipe"]["augment"] == "shift" and out["results"]["a"]["recipe"]["epochs"] == 1
    for row in out["results"].values():
        assert 0 <= row["UA"] <= 100 and 0 <= row["TA"] <= 100 and row["seconds"] > 0
    bad = subprocess.run([*args, "--recipe", "x=paper:wings=2"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "unknown field 'wings'" in bad.stderr
