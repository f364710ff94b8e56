#!/usr/bin/env python
"""Memory to serve N distinct forget configurations at once: one engine plus a bank of N vectors
(forget vectors) vs N model copies (model-based unlearning: one fine-tuned copy per request).

Each configuration is measured in a fresh subprocess as the growth of resident memory (RSS) from
just before loading to just after loading and running one inference:

- forget vectors: ``Runtime.load`` of a bundle with N selectable vectors (onnxruntime CPU);
- model copies: N onnxruntime sessions of the bare classifier, each with its own weights.

Model copies are measured up to ``--max-measured-copies``; beyond that the per-copy cost measured at
the largest N is multiplied out and the row is labelled ``computed``.

    python benchmarks/serving_memory.py --arch resnet18-cifar --n 1,10,100,1000 --json runs/serving_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

_PROBE = textwrap.dedent(
    """
    import sys, json, numpy as np
    def rss():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    import onnxruntime as ort
    from forgetrt.runtime import Runtime, RuntimeConfig
    mode, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    before = rss()
    if mode == "vectors":
        rt = Runtime.load(path, RuntimeConfig(backend="onnxruntime", device="cpu"))
        x = np.zeros((1, *rt.iospec.shape), np.float32)
        rt.infer(x, [rt.snapshot.names[-1]])
    else:
        so = ort.SessionOptions(); so.log_severity_level = 3
        sessions = [ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]) for _ in range(n)]
        inp = sessions[0].get_inputs()[0]
        x = np.zeros([1] + list(inp.shape[1:]), np.float32)
        for s in sessions:
            s.run(None, {inp.name: x})
    print(json.dumps({"rss_growth_bytes": rss() - before}))
    """
)


def _probe(mode: str, path: Path, n: int) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode, str(path), str(n)], capture_output=True, text=True, check=True
    )
    return int(json.loads(out.stdout.strip().splitlines()[-1])["rss_growth_bytes"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18-cifar")
    p.add_argument("--n", default="1,10,100,1000")
    p.add_argument("--max-measured-copies", type=int, default=10)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    a = p.parse_args(argv)
    import torch

    from forgetrt.export.onnx_export import export_onnx
    from forgetrt.export.torch_onnx import classifier_to_onnx
    from forgetrt.runtime import IOSpec, VectorBank
    from forgetrt.runtime.architectures import create_model, model_input_shape
    from forgetrt.runtime.model_folder import model_fingerprint, save_model

    ns = [int(v) for v in a.n.split(",")]
    c, h, w = model_input_shape(a.arch)
    spec = IOSpec(shape=(c, h, w), mean=(0.5,) * c, std=(0.25,) * c, labels=tuple(str(i) for i in range(10)))
    torch.manual_seed(0)
    model = create_model(a.arch, spec).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_model(root / "model", model, arch=a.arch, iospec=spec)
        clf = root / "classifier.onnx"
        clf.write_bytes(classifier_to_onnx(model, spec).SerializeToString())
        rng = np.random.default_rng(0)
        per_copy = None
        for n in ns:
            bank = VectorBank.create(model_fingerprint(model), a.arch, spec)
            for i in range(n):
                bank.add(
                    f"v{i}",
                    rng.normal(0, 0.05, spec.shape).astype(np.float32),
                    forgets={"kind": "class", "classes": [i % 10]},
                    recipe={},
                )
            bank.save(root / f"bank{n}")
            export_onnx(root / f"bank{n}", root / f"bundle{n}", model_dir=root / "model", overwrite=True)
            vec = _probe("vectors", root / f"bundle{n}", n)
            if n <= a.max_measured_copies:
                copies, how = _probe("copies", clf, n), "measured"
                per_copy = copies / n
            else:
                if per_copy is None:
                    per_copy = _probe("copies", clf, 1)
                copies, how = int(per_copy * n), f"computed ({per_copy / 2**20:.1f} MiB per copy x {n})"
            rows.append(
                {
                    "n": n,
                    "forget_vectors_bytes": vec,
                    "model_copies_bytes": copies,
                    "model_copies": how,
                    "ratio": copies / max(vec, 1),
                }
            )
            print(
                f"N={n:>5}: one engine + {n} vectors {vec / 2**20:8.1f} MiB | {n} model copies {copies / 2**20:10.1f} "
                f"MiB ({how}) | {copies / max(vec, 1):6.1f}x",
                flush=True,
            )
    env = {
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "weights_mib": sum(p.numel() * 4 for p in model.state_dict().values()) / 2**20,
    }
    result = {"arch": a.arch, "env": env, "rows": rows}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2))
    if a.markdown:
        md = ["| N | one engine + N vectors (MiB) | N model copies (MiB) | copies / vectors |", "|---|---|---|---|"]
        md += [
            f"| {r['n']} | {r['forget_vectors_bytes'] / 2**20:.1f} | {r['model_copies_bytes'] / 2**20:.1f} "
            f"({r['model_copies']}) | {r['ratio']:.1f}x |"
            for r in rows
        ]
        Path(a.markdown).write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
