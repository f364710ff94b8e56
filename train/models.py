"""The model folder format (architectures live in :mod:`forgetrt.runtime.models`, re-exported here).

Every model starts with a :class:`Normalize` layer, so its input contract is [0, 1] pixels (the space
forget vectors live in) and the normalization constants travel inside the weights.

A model folder holds ``model.safetensors`` (the state dict) and ``model.json`` (arch, IOSpec, weights
fingerprint, accuracies, training recipe). Example::

    model = create_model("digits-cnn", IOSpec(shape=(1, 8, 8), mean=(0.3,), std=(0.4,), labels=...))
    save_model("runs/model", model, arch="digits-cnn", iospec=spec)
    model, info = load_model("runs/model")
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from forgetrt.runtime.errors import ArtifactError, CorruptArtifactError
from forgetrt.runtime.files import atomic_write, atomic_write_json, read_json, weights_fingerprint
from forgetrt.runtime.iospec import IOSpec
from forgetrt.runtime.models import Normalize, create_model, list_models, model_input_shape, register_model

__all__ = [
    "Normalize",
    "ModelInfo",
    "register_model",
    "create_model",
    "list_models",
    "model_input_shape",
    "save_model",
    "load_model",
    "model_fingerprint",
    "MODEL_FILE",
    "MODEL_JSON",
]

MODEL_FILE = "model.safetensors"
MODEL_JSON = "model.json"
MODEL_SCHEMA_VERSION = 1


# --------------------------------------------------------------------------- model folders


@dataclass(frozen=True)
class ModelInfo:
    """What model.json says about a model folder."""

    arch: str
    iospec: IOSpec
    fingerprint: str
    path: Path
    record: dict[str, Any]


def _state_numpy(model: nn.Module) -> dict[str, Any]:
    return {k: v.detach().cpu().contiguous().numpy() for k, v in model.state_dict().items()}


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the classifier's weights (see :func:`forgetrt.runtime.files.weights_fingerprint`)."""
    return weights_fingerprint(_state_numpy(model))


def save_model(
    path: str | os.PathLike, model: nn.Module, *, arch: str, iospec: IOSpec, **record: Any
) -> ModelInfo:
    """Write ``model.safetensors`` + ``model.json`` atomically; extra keyword fields go into the JSON."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fp = model_fingerprint(model)
    atomic_write(path / MODEL_FILE, lambda p: save_file(state, str(p), metadata={"format": "forgetrt.model", "arch": arch}))
    rec = {
        "schema_version": MODEL_SCHEMA_VERSION,
        "kind": "forgetrt.model",
        "arch": arch,
        "iospec": iospec.to_dict(),
        "fingerprint": fp,
        **record,
    }
    atomic_write_json(path / MODEL_JSON, rec)
    return ModelInfo(arch, iospec, fp, path, rec)


def read_model_info(path: str | os.PathLike) -> ModelInfo:
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"model folder not found: {path}")
    rec = read_json(path / MODEL_JSON, "model record")
    if not isinstance(rec, dict) or rec.get("kind") != "forgetrt.model":
        raise CorruptArtifactError(f"{path / MODEL_JSON} is not a ForgetRT model record")
    try:
        arch, fp = str(rec["arch"]), str(rec["fingerprint"])
    except KeyError as e:
        raise CorruptArtifactError(f"{path / MODEL_JSON} lacks field {e}") from e
    return ModelInfo(arch, IOSpec.from_dict(rec.get("iospec") or {}), fp, path, rec)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelInfo]:
    """Load a model folder in eval mode, verifying its weights against the recorded fingerprint."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    info = read_model_info(path)
    model = create_model(info.arch, info.iospec)
    wfile = info.path / MODEL_FILE
    if not wfile.is_file():
        raise ArtifactError(f"model weights not found: {wfile}")
    try:
        state = load_file(str(wfile))
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptArtifactError(f"cannot read {wfile}: {e}") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CorruptArtifactError(f"{wfile} does not fit arch {info.arch!r}: {str(e).splitlines()[0]}") from e
    fp = model_fingerprint(model)
    if fp != info.fingerprint:
        raise CorruptArtifactError(
            f"{wfile} has weights fingerprint {fp[:16]}…, {MODEL_JSON} records {info.fingerprint[:16]}…"
        )
    model.eval()
    return model.to(device), info
