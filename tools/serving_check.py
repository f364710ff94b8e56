"""Serve a bundle and answer ``tritonclient.http`` requests from the environment this runs in: the check
that a serving-only install (``pip install "forgetrt[cpu]"``, no torch) loads, serves and answers.

    python -m forgetrt.tools.serving_check BUNDLE [--expect-no torch,sklearn,matplotlib] [--workers 2]

Starts ``forgetrt serve`` on a free port in a child process, sends one request per policy and one with
explicit coefficients, checks each answer's shape and finiteness, that a composition changes the logits,
and that ``forgetrt train-model`` names the extra it needs. Prints one JSON line; exit 0 when all hold.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(bundle: str, expect_missing: list[str], timeout_s: float = 60.0, workers: int = 1) -> dict:
    import tritonclient.http as th

    from forgetrt.runtime.bundle import Bundle

    present = [m for m in expect_missing if importlib.util.find_spec(m) is not None]
    if present:
        raise SystemExit(f"expected a serving-only environment, but these are importable: {present}")
    b = Bundle.load(bundle)
    port = _free_port()
    cli = [sys.executable, "-m", "forgetrt.tools.cli"]
    proc = subprocess.Popen(
        [*cli, "serve", bundle, "--port", str(port), "--device", "cpu", "--model-name", "m", "--workers", str(workers)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        client = th.InferenceServerClient(f"127.0.0.1:{port}")
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if client.is_server_ready():
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not come up:\n{proc.stdout.read().decode() if proc.stdout else ''}")
            time.sleep(0.1)
        spec = b.iospec
        lo, hi = spec.input_range
        x = np.random.default_rng(0).uniform(lo, hi, (2, *spec.shape)).astype(np.float32)
        answers = {}
        for label, params in [("none", {}), *[(p, {"policy": p}) for p in b.manifest.policies]]:
            inp = th.InferInput(spec.image_name, list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            res = client.infer("m", [inp], parameters=params or None)
            y = res.as_numpy(spec.output_name)
            if y is None or y.shape != (2, spec.num_classes) or not np.all(np.isfinite(y)):
                raise SystemExit(f"bad answer for {label}: {None if y is None else y.shape}")
            answers[label] = y
        changed = any(not np.allclose(answers["none"], y) for k, y in answers.items() if k != "none")
        if b.manifest.policies and not changed:
            raise SystemExit("a policy did not change the logits")
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0].decode()
    r = subprocess.run(
        [*cli, "train-model", "--arch", "digits-cnn", "--data", "digits", "--out", os.devnull],
        capture_output=True,
        text=True,
    )
    names_extra = "torch" in expect_missing and r.returncode == 4 and "forgetrt[train]" in r.stderr
    if "torch" in expect_missing and not names_extra:
        raise SystemExit(
            f"train-model without torch should name the 'train' extra (exit 4), got {r.returncode}: {r.stderr}"
        )
    return {
        "served": bundle,
        "workers": workers,
        "answers": len(answers),
        "policies_change_logits": changed,
        "train_names_extra": names_extra,
        "missing_as_expected": expect_missing,
        "server_log_lines": len(out.splitlines()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--expect-no", default="torch,sklearn,matplotlib", help="modules that must not be importable")
    ap.add_argument("--workers", type=int, default=1, help="serve --workers: front-end processes [default: 1]")
    a = ap.parse_args()
    print(json.dumps(check(a.bundle, [m for m in a.expect_no.split(",") if m], workers=a.workers)))


if __name__ == "__main__":
    main()
