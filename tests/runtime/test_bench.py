"""`forgetrt bench`: a 2-point run on the digits bundle, its JSON lines and plot, and its errors."""

import json
import time

import pytest
from click.testing import CliRunner

from forgetrt.runtime import BatchingConfig, InvalidInputError, Runtime, RuntimeConfig, UnknownNameError
from forgetrt.runtime.bench import BenchConfig, run_bench
from forgetrt.tools.cli import cli


def test_two_point_bench_fields_and_order(digits_bundle, tmp_path):
    t0 = time.perf_counter()
    r = CliRunner().invoke(
        cli,
        [
            "bench",
            str(digits_bundle),
            "--device",
            "cpu",
            "--backend",
            "onnxruntime",
            "--batch",
            "1,8",
            "--concurrency",
            "1",
            "--duration",
            "2",
            "--warmup",
            "0.5",
            "--json",
            str(tmp_path / "b.jsonl"),
            "--plot",
            str(tmp_path / "b.png"),
            "--compare-bare",
        ],
    )
    elapsed = time.perf_counter() - t0
    assert r.exit_code == 0, r.output
    assert elapsed < 30, elapsed
    assert "p50" in r.stdout and "img/s" in r.stdout
    lines = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [rec["point"]["batch"] for rec in lines] == [1, 8]
    for rec in lines:
        lat = rec["latency"]
        assert lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p95_ms"] <= lat["p99_ms"] <= lat["max_ms"]
        assert lat["min_ms"] <= lat["mean_ms"] <= lat["max_ms"]
        assert rec["throughput"]["images_per_s"] == pytest.approx(
            rec["throughput"]["requests_per_s"] * rec["point"]["batch"]
        )
        assert rec["requests"] > 10
        for key in ("python", "numpy", "onnxruntime", "machine", "backend", "device", "device_name", "forgetrt"):
            assert key in rec["env"]
        for key in ("batches", "concurrency", "active_vectors", "mix", "duration", "warmup", "bundle_id"):
            assert key in rec["config"]
        assert {"queue_us", "compute_us"} <= set(rec) and rec["bare"]["latency"]["p50_ms"] > 0
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batcher_points_report_queue_time(digits_bundle):
    with Runtime.load(
        digits_bundle, RuntimeConfig(backend="onnxruntime", device="cpu", batching=BatchingConfig(max_batch_size=8))
    ) as rt:
        recs = run_bench(
            rt,
            BenchConfig(
                batches=(1,), concurrency=(4,), active_vectors=(0, 2), mix="homogeneous", duration=0.5, warmup=0.1
            ),
            progress=False,
        )
    assert [r["point"]["active_vectors"] for r in recs] == [0, 2]
    assert all(r["point"]["path"] == "batcher" and r["queue_us"]["mean"] > 0 for r in recs)


def test_bench_errors(digits_bundle, tmp_path):
    with pytest.raises(InvalidInputError, match="duration"):
        BenchConfig(duration=0)
    with pytest.raises(UnknownNameError, match="mix"):
        BenchConfig(mix="random")
    with Runtime.load(
        digits_bundle, RuntimeConfig(backend="onnxruntime", device="cpu", batching=BatchingConfig(max_batch_size=8))
    ) as rt:
        with pytest.raises(InvalidInputError, match=r"batch sizes \[16\] exceed"):
            run_bench(rt, BenchConfig(batches=(16,), duration=0.1), progress=False)
        with pytest.raises(InvalidInputError, match="active vectors"):
            run_bench(rt, BenchConfig(batches=(1,), active_vectors=(20,), duration=0.1), progress=False)
    runner = CliRunner()
    r = runner.invoke(cli, ["bench", str(digits_bundle), "--backend", "tvm"])
    assert r.exit_code == 2 and "tvm" in r.output
    r = runner.invoke(cli, ["bench", str(digits_bundle), "--device", "cpu", "--duration", "0"])
    assert r.exit_code == 2 and "duration must be > 0" in r.output
    r = runner.invoke(
        cli,
        ["bench", str(digits_bundle), "--device", "cpu", "--json", str(tmp_path / "no" / "such" / "dir" / "x.jsonl")],
    )
    assert r.exit_code == 2 and "cannot write --json file" in r.output
    r = runner.invoke(cli, ["bench", str(digits_bundle), "--device", "cpu", "--plot", str(tmp_path)])
    assert r.exit_code == 2 and "is a directory" in r.output
