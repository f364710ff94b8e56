"""`forgetrt demo`, the README's main job, end to end (about 40 s on 2 CPU cores)."""

import json

from click.testing import CliRunner

from forgetrt.tools.cli import cli


def test_demo_writes_report_with_bars_met(tmp_path):
    r = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "demo")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert rep["model"]["test_acc"] >= 97
    for c in range(10):
        assert rep["results"][f"forget-{c}"]["UA"] >= 95
    assert min(rep["results"]["learned-0-3"]["UA_per_class"].values()) >= 90
    assert rep["results"]["refined-0-3"]["UA"] >= 90 and "refined-0-3" in r.output
    assert rep["export"]["parity"]["onnxruntime"]["status"] == "ok"
    assert "parity of" in r.output and "learned-0-3" in r.output
    assert (tmp_path / "demo" / "bundle" / "model.onnx").is_file()
    served = rep["served"]
    assert served["requests"] == 5 and served["engine_calls"] == 1  # five compositions, one engine call
    assert served["rows"][0]["predicted"] == "3" and served["rows"][1]["predicted"] != "3"
