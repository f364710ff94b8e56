"""The model folder: one frozen classifier as ``model.safetensors`` (its state dict) + ``model.json``.

``model.json`` is a :class:`ModelManifest`: the architecture, the IOSpec, the weights fingerprint and
what produced the weights (data spec, accuracies, training recipe; for a model-based unlearning
baseline, what it unlearned). This module owns the format: training writes it, export reads it, and a
bundle carries the same two files (as ``classifier.json`` / ``classifier.safetensors``) and loads them
through the same :func:`classifier_from_bytes`, so a model has one loader and one set of errors.

The manifest is readable without PyTorch; building the classifier imports torch (lazily). Example::

    save_model("runs/model", module, arch="digits-cnn", iospec=spec, metrics={"test_acc": 98.4})
    module, manifest = load_model("runs/model")          # fingerprint-checked, eval mode
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ArtifactError, CorruptArtifactError
from .files import atomic_write, atomic_write_json, read_json, weights_fingerprint
from .iospec import IOSpec

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = [
    "MODEL_WEIGHTS",
    "MODEL_MANIFEST",
    "MODEL_PROGRAM",
    "ModelManifest",
    "read_model_manifest",
    "save_model",
    "load_model",
    "model_fingerprint",
    "classifier_from_bytes",
]

MODEL_WEIGHTS = "model.safetensors"
#: a classifier brought as a torch.export program keeps it here (arch "torch.export"); its weights are
#: also in model.safetensors, which stays the authority (fingerprint, strict load over the program's)
MODEL_PROGRAM = "model.pt2"
MODEL_MANIFEST = "model.json"
MODEL_SCHEMA_VERSION = 1
_KIND = "forgetrt.model"


@dataclass(frozen=True)
class ModelManifest:
    """What ``model.json`` says about a classifier. ``path`` is where it was read from (not saved)."""

    arch: str
    iospec: IOSpec
    fingerprint: str
    data: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    #: for a model-based unlearning baseline: method, what it forgets, source fingerprint, seconds
    unlearning: dict[str, Any] | None = None
    #: the training images held out of the classifier's training (fraction, seed, count, sha256 of the
    #: indices): data the model never saw, which vector tuning uses as its validation split
    validation: dict[str, Any] | None = None
    path: Path | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = {"schema_version": MODEL_SCHEMA_VERSION, "kind": _KIND, **asdict(self)}
        d["iospec"] = self.iospec.to_dict()
        del d["path"]
        for k in ("unlearning", "validation"):
            if d[k] is None:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = MODEL_MANIFEST) -> ModelManifest:
        if not isinstance(d, dict) or d.get("kind") != _KIND:
            raise CorruptArtifactError(f"{where} is not a ForgetRT model manifest")
        if d.get("schema_version") != MODEL_SCHEMA_VERSION:
            raise CorruptArtifactError(
                f"{where}: schema_version {d.get('schema_version')!r} is not supported (expected "
                f"{MODEL_SCHEMA_VERSION})"
            )
        try:
            return cls(
                arch=str(d["arch"]),
                iospec=IOSpec.from_dict(d.get("iospec") or {}),
                fingerprint=str(d["fingerprint"]),
                data=None if d.get("data") is None else str(d["data"]),
                metrics=dict(d.get("metrics") or {}),
                training=dict(d.get("training") or {}),
                unlearning=None if d.get("unlearning") is None else dict(d["unlearning"]),
                validation=None if d.get("validation") is None else dict(d["validation"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, CorruptArtifactError):
                raise
            raise CorruptArtifactError(f"{where} lacks or mangles field {e}") from e


def read_model_manifest(path: str | os.PathLike) -> ModelManifest:
    """The manifest of a model folder (no torch needed)."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"model folder not found: {path}")
    m = ModelManifest.from_dict(read_json(path / MODEL_MANIFEST, "model manifest"), str(path / MODEL_MANIFEST))
    return replace(m, path=path)


def _state_numpy(module: nn.Module) -> dict[str, Any]:
    return {k: v.detach().cpu().contiguous().numpy() for k, v in module.state_dict().items()}


def model_fingerprint(module: nn.Module) -> str:
    """sha256 of a classifier's weights (see :func:`forgetrt.runtime.files.weights_fingerprint`)."""
    return weights_fingerprint(_state_numpy(module))


def save_model(
    path: str | os.PathLike,
    module: nn.Module,
    *,
    arch: str,
    iospec: IOSpec,
    data: str | None = None,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    unlearning: dict[str, Any] | None = None,
    validation: dict[str, Any] | None = None,
    program: bytes | None = None,
) -> ModelManifest:
    """Write ``model.safetensors`` (and ``model.pt2`` for a torch.export ``program``) then ``model.json``,
    each atomically, and return the manifest (its fingerprint computed from ``module``)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"model path {path} exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    manifest = ModelManifest(
        arch,
        iospec,
        model_fingerprint(module),
        data,
        dict(metrics or {}),
        dict(training or {}),
        unlearning,
        validation,
        path,
    )
    if program is not None:
        atomic_write(path / MODEL_PROGRAM, lambda p: p.write_bytes(program))
    atomic_write(
        path / MODEL_WEIGHTS, lambda p: save_file(state, str(p), metadata={"format": _KIND, "arch": manifest.arch})
    )
    atomic_write_json(path / MODEL_MANIFEST, manifest.to_dict())
    return manifest


def classifier_from_bytes(
    manifest_json: bytes, weights: bytes, *, where: str = "classifier", program: bytes | None = None
) -> tuple[nn.Module, ModelManifest]:
    """Build the classifier (eval mode, CPU) from a manifest and safetensors bytes (and, for a
    torch.export classifier, its program), checked against the manifest's fingerprint. The one loader
    for model folders and bundles alike."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    from .architectures import TORCH_EXPORT, create_model, program_model

    try:
        raw = json.loads(manifest_json)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptArtifactError(f"{where} manifest is not valid JSON: {e}") from e
    manifest = ModelManifest.from_dict(raw, f"{where} manifest")
    if manifest.arch == TORCH_EXPORT:
        if program is None:
            raise ArtifactError(f"{where} is a torch.export classifier and its program ({MODEL_PROGRAM}) is missing")
        module = program_model(program, manifest.iospec)
    else:
        module = create_model(manifest.arch, manifest.iospec)
    try:
        state = load_safetensors(weights)
    except (SafetensorError, ValueError) as e:
        raise CorruptArtifactError(f"cannot read the {where} weights: {e}") from e
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CorruptArtifactError(
            f"the {where} weights do not fit arch {manifest.arch!r}: {str(e).splitlines()[0]}"
        ) from e
    fp = model_fingerprint(module)
    if fp != manifest.fingerprint:
        raise CorruptArtifactError(
            f"the {where} weights have fingerprint {fp[:16]}…, the manifest records {manifest.fingerprint[:16]}…"
        )
    return module.eval(), manifest


def load_model(path: str | os.PathLike, device: Any = "cpu") -> tuple[nn.Module, ModelManifest]:
    """Load a model folder in eval mode on ``device``, verifying its weights against the fingerprint."""
    path = Path(path)
    read_model_manifest(path)  # a missing folder or a bad manifest fails before the weights are read
    wfile = path / MODEL_WEIGHTS
    if not wfile.is_file():
        raise ArtifactError(f"model weights not found: {wfile}")
    program = (path / MODEL_PROGRAM).read_bytes() if (path / MODEL_PROGRAM).is_file() else None
    if program is not None:  # the graph is not in the weights' fingerprint: its file hash is recorded instead
        import hashlib

        want = ((read_model_manifest(path).training.get("imported") or {}).get("sha256")) or ""
        if hashlib.sha256(program).hexdigest() != want:
            raise CorruptArtifactError(
                f"model {path}: {MODEL_PROGRAM} does not match the program this folder was made from (sha256 "
                f"{hashlib.sha256(program).hexdigest()[:16]}…, recorded {want[:16] or 'none'}…)"
            )
    module, manifest = classifier_from_bytes(
        (path / MODEL_MANIFEST).read_bytes(), wfile.read_bytes(), where=f"model {path}", program=program
    )
    return module.to(device), replace(manifest, path=path)
