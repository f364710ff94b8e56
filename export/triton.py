"""Triton Inference Server model repository for a bundle: the same fused engine served at scale.

Writes ``REPO/NAME/config.pbtxt``, ``REPO/NAME/1/model.onnx`` (or ``model.plan``) and
``REPO/NAME/labels.txt``. Inputs ``image`` [C, H, W] and ``coeffs`` [K] and the output are declared
without the batch dimension, with ``max_batch_size``, ``dynamic_batching`` and ``instance_group``, so
Triton's own dynamic batcher groups requests with different compositions into one engine call.

What Triton cannot do that ``forgetrt serve`` does: take vector names, weights or policies (clients send
the raw ``coeffs`` row: build it with :mod:`forgetrt.client`, which checks names and the range from the
parameters recorded here), refuse coefficients outside the bundle's range (the graph clips them, so the
export asks for ``accept_clipping`` on a bundle with a range), check the pixel range, report the bank
version, or change the bank (the bank is a constant of the served graph; a new bank is a new model
version).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from forgetrt.runtime.batcher import BatchingConfig
from forgetrt.runtime.bundle import Bundle
from forgetrt.runtime.errors import ArtifactError, InvalidInputError, unknown
from forgetrt.runtime.files import ensure_writable_dir

__all__ = ["export_triton", "TRITON_BACKENDS"]

TRITON_BACKENDS = {
    "onnx": ("onnxruntime_onnx", "model.onnx", "KIND_AUTO"),
    "trt": ("tensorrt_plan", "model.plan", "KIND_GPU"),
}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def export_triton(
    bundle_path: str | os.PathLike,
    repo: str | os.PathLike,
    *,
    name: str | None = None,
    backend: str = "onnx",
    batching: BatchingConfig = BatchingConfig(),
    overwrite: bool = False,
    accept_clipping: bool = False,
) -> dict[str, Any]:
    """``batching`` is the runtime's own batching config: Triton's dynamic batcher gets the same batch
    size, queue delay, queue bound and instance count as ``forgetrt serve`` with that config.
    ``accept_clipping``: required for a bundle with a coefficient range, whose graph clips what Triton
    clients send outside it (ForgetRT's runtime refuses such requests; Triton cannot)."""
    bundle = Bundle.load(bundle_path)
    cr = bundle.manifest.coeff_range
    if cr is not None and not accept_clipping:
        raise InvalidInputError(
            f"bundle {bundle.path} has the coefficient range [{cr[0]:g}, {cr[1]:g}]: served by Triton, its graph "
            "clips coefficients outside it instead of refusing the request. Build coefficient rows with "
            "forgetrt.client (it refuses them) and pass --accept-clipping"
        )
    if not isinstance(batching, BatchingConfig):
        raise InvalidInputError(f"batching must be a BatchingConfig, got {type(batching).__name__}")
    if backend not in TRITON_BACKENDS:
        raise unknown("Triton backend", backend, TRITON_BACKENDS)
    name = name or bundle.path.name
    if not _NAME_RE.match(name):
        raise InvalidInputError(f"invalid Triton model name {name!r}: use letters, digits, '_', '.', '-'")
    platform, filename, kind = TRITON_BACKENDS[backend]
    src = bundle.path / filename
    if not src.is_file():
        raise ArtifactError(
            f"bundle {bundle.path} has no {filename}"
            + (": run `forgetrt export trt` first" if backend == "trt" else "")
        )
    if backend == "trt":
        engine_max = bundle.manifest.tensorrt.max_batch_size if bundle.manifest.tensorrt else 0
        if batching.max_batch_size > engine_max:
            raise InvalidInputError(
                f"max batch size {batching.max_batch_size} exceeds the TensorRT engine's profile maximum {engine_max}"
            )
    import onnx

    output = onnx.load(str(bundle.onnx_path), load_external_data=False).graph.output[0].name
    spec = bundle.iospec
    dims = ", ".join(str(d) for d in spec.shape)
    config = f"""name: "{name}"
platform: "{platform}"
max_batch_size: {batching.max_batch_size}
input [
  {{
    name: "{spec.image_name}"
    data_type: TYPE_FP32
    dims: [ {dims} ]
  }},
  {{
    name: "{spec.coeffs_name}"
    data_type: TYPE_FP32
    dims: [ {len(bundle.vectors)} ]
  }}
]
output [
  {{
    name: "{output}"
    data_type: TYPE_FP32
    dims: [ {spec.num_classes} ]
    label_filename: "labels.txt"
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {batching.max_queue_delay_us}
  default_queue_policy {{
    max_queue_size: {batching.max_queue}
  }}
}}
instance_group [
  {{
    count: {batching.instances}
    kind: {kind}
  }}
]
parameters {{
  key: "forgetrt_vectors"
  value: {{ string_value: "{",".join(bundle.vectors)}" }}
}}
parameters {{
  key: "forgetrt_bundle_id"
  value: {{ string_value: "{bundle.bundle_id}" }}
}}
parameters {{
  key: "forgetrt_coeff_range"
  value: {{ string_value: "{"" if cr is None else f"{cr[0]!r},{cr[1]!r}"}" }}
}}
parameters {{
  key: "forgetrt_policies"
  value: {{ string_value: {json.dumps(json.dumps(bundle.manifest.policies, sort_keys=True))} }}
}}
parameters {{
  key: "forgetrt_mandatory"
  value: {{ string_value: {json.dumps(json.dumps(bundle.manifest.mandatory, sort_keys=True))} }}
}}
"""
    repo = Path(repo)
    dest = repo / name
    if dest.exists() and not overwrite:
        raise ArtifactError(f"{dest} already exists; pass --overwrite to replace it")
    ensure_writable_dir(dest, "Triton model folder")  # --overwrite replaces a folder, nothing else
    repo.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repo))
    try:
        (tmp / "1").mkdir()
        shutil.copyfile(src, tmp / "1" / filename)
        (tmp / "config.pbtxt").write_text(config)
        (tmp / "labels.txt").write_text("\n".join(spec.labels) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "model_dir": str(dest),
        "platform": platform,
        "max_batch_size": batching.max_batch_size,
        "vectors": list(bundle.vectors),
    }
