"""The bundle: what the runtime loads. A folder with ``model.onnx``, ``vectors.safetensors``,
optionally the PyTorch classifier (``classifier.safetensors`` + ``classifier.json``, a model folder's
two files) or the original ONNX classifier it was grafted onto, optionally a TensorRT ``model.plan``,
and ``bundle.json``.

``bundle.json`` is a :class:`BundleManifest`: the bundle id, the IOSpec, the selectable vector names in
coefficient order (K), the mandatory vectors baked into the graph with their weights, the coefficient
range, named policies, the model fingerprint, the source bank's entries, the export-time parity, the
TensorRT build (if any) and the sha256 of every other file. This module owns the format: nobody else
reads ``bundle.json`` keys. Written into a temporary sibling folder and renamed into place; loading
verifies every hash.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .bank import VectorEntry
from .errors import ArtifactError, CorruptArtifactError
from .files import atomic_write, atomic_write_json, read_json, sha256_file
from .iospec import IOSpec
from .model_folder import ModelManifest

__all__ = [
    "Bundle",
    "BundleManifest",
    "TensorRTBuild",
    "BUNDLE_FILE",
    "BUNDLE_SCHEMA_VERSION",
    "MODEL_ONNX",
    "MODEL_PLAN",
    "VECTORS_FILE",
    "CLASSIFIER_WEIGHTS",
    "CLASSIFIER_JSON",
    "CLASSIFIER_ONNX",
    "write_bundle",
    "add_bundle_file",
]

BUNDLE_FILE = "bundle.json"
MODEL_ONNX = "model.onnx"
MODEL_PLAN = "model.plan"
VECTORS_FILE = "vectors.safetensors"
CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_JSON = "classifier.json"
CLASSIFIER_ONNX = "classifier.onnx"
BUNDLE_SCHEMA_VERSION = 1
_KIND = "forgetrt.bundle"


# bundle.json written before the max_batch -> max_batch_size rename (same schema version)
_LEGACY_TRT_KEYS = {"min_batch": "min_batch_size", "opt_batch": "opt_batch_size", "max_batch": "max_batch_size"}


@dataclass(frozen=True)
class TensorRTBuild:
    """How ``model.plan`` was built (``forgetrt export trt``)."""

    fp16: bool
    min_batch_size: int
    opt_batch_size: int
    max_batch_size: int
    refittable: bool
    tensorrt_version: str


@dataclass(frozen=True)
class BundleManifest:
    """Everything ``bundle.json`` records (``files``: name -> sha256 of every other file)."""

    bundle_id: str
    iospec: IOSpec
    model_fingerprint: str
    vectors: tuple[str, ...]
    source: str  # "model" (exported from a model folder) | "onnx" (grafted onto an ONNX classifier)
    arch: str
    model_verified: bool
    opset: int
    mandatory: dict[str, float] = field(default_factory=dict)
    coeff_range: tuple[float, float] | None = None
    policies: dict[str, dict[str, float]] = field(default_factory=dict)
    bank_entries: dict[str, VectorEntry] = field(default_factory=dict)
    classifier_onnx_sha256: str | None = None
    parity: dict[str, Any] = field(default_factory=dict)
    tensorrt: TensorRTBuild | None = None
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["iospec"] = self.iospec.to_dict()
        d["vectors"] = list(self.vectors)
        d["coeff_range"] = list(self.coeff_range) if self.coeff_range else None
        d["bank_entries"] = {n: e.to_dict() for n, e in self.bank_entries.items()}
        return {"schema_version": BUNDLE_SCHEMA_VERSION, "kind": _KIND, **d}

    @classmethod
    def from_dict(cls, d: Any, where: str = BUNDLE_FILE) -> BundleManifest:
        if not isinstance(d, dict) or d.get("kind") != _KIND:
            raise CorruptArtifactError(f"{where} is not a ForgetRT bundle manifest")
        if d.get("schema_version") != BUNDLE_SCHEMA_VERSION:
            raise CorruptArtifactError(f"{where}: unsupported schema_version {d.get('schema_version')!r}")
        try:
            cr = d.get("coeff_range")
            trt = d.get("tensorrt")
            return cls(
                bundle_id=str(d["bundle_id"]),
                iospec=IOSpec.from_dict(d["iospec"]),
                model_fingerprint=str(d["model_fingerprint"]),
                vectors=tuple(str(v) for v in d["vectors"]),
                source=str(d.get("source", "model")),
                arch=str(d.get("arch", "")),
                model_verified=bool(d.get("model_verified", False)),
                opset=int(d.get("opset", 0)),
                mandatory={str(k): float(v) for k, v in (d.get("mandatory") or {}).items()},
                coeff_range=(float(cr[0]), float(cr[1])) if cr else None,
                policies={
                    str(p): {str(n): float(w) for n, w in ws.items()} for p, ws in (d.get("policies") or {}).items()
                },
                bank_entries={str(n): VectorEntry.from_dict(e, n) for n, e in (d.get("bank_entries") or {}).items()},
                classifier_onnx_sha256=d.get("classifier_onnx_sha256"),
                parity=dict(d.get("parity") or {}),
                tensorrt=TensorRTBuild(**{_LEGACY_TRT_KEYS.get(k, k): v for k, v in trt.items()}) if trt else None,
                files={str(k): str(v) for k, v in (d.get("files") or {}).items()},
            )
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            if isinstance(e, CorruptArtifactError):
                raise
            raise CorruptArtifactError(f"{where} is malformed: {e!r}") from e


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle folder: its path and its verified manifest."""

    path: Path
    manifest: BundleManifest

    # the fields every consumer needs, without reaching through .manifest
    @property
    def bundle_id(self) -> str:
        return self.manifest.bundle_id

    @property
    def iospec(self) -> IOSpec:
        return self.manifest.iospec

    @property
    def vectors(self) -> tuple[str, ...]:
        return self.manifest.vectors

    @property
    def mandatory(self) -> dict[str, float]:
        return self.manifest.mandatory

    @property
    def coeff_range(self) -> tuple[float, float] | None:
        return self.manifest.coeff_range

    @property
    def fingerprint(self) -> str:
        return self.manifest.model_fingerprint

    @property
    def onnx_path(self) -> Path:
        return self.path / MODEL_ONNX

    @property
    def plan_path(self) -> Path:
        return self.path / MODEL_PLAN

    @property
    def has_torch_classifier(self) -> bool:
        """True when the bundle carries the PyTorch weights (exported from a model folder, not grafted)."""
        return CLASSIFIER_WEIGHTS in self.manifest.files

    @property
    def has_plan(self) -> bool:
        return MODEL_PLAN in self.manifest.files

    def read(self, name: str) -> bytes:
        """One of the bundle's recorded files."""
        if name not in self.manifest.files:
            raise ArtifactError(f"bundle {self.path} has no {name}")
        return (self.path / name).read_bytes()

    def classifier_manifest(self) -> ModelManifest | None:
        """The PyTorch classifier's model manifest, or None for a grafted bundle."""
        if not self.has_torch_classifier:
            return None
        import json

        return ModelManifest.from_dict(json.loads(self.read(CLASSIFIER_JSON)), f"{self.path / CLASSIFIER_JSON}")

    def load_classifier(self, device: Any = "cpu"):
        """The bundle's PyTorch classifier in eval mode (imports torch), fingerprint-checked against the
        classifier manifest and the bundle. None for a grafted bundle."""
        if not self.has_torch_classifier:
            return None
        from .errors import MismatchError
        from .model_folder import classifier_from_bytes

        module, m = classifier_from_bytes(
            self.read(CLASSIFIER_JSON), self.read(CLASSIFIER_WEIGHTS), where=f"bundle {self.path} classifier"
        )
        if m.fingerprint != self.fingerprint:
            raise MismatchError(
                f"bundle {self.path}: classifier fingerprint {m.fingerprint[:16]}… differs from the bundle's "
                f"{self.fingerprint[:16]}…"
            )
        return module.to(device)

    def vector_arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The selectable vectors as [K, C·H·W] (coefficient order) and the summed mandatory δ [C, H, W] or None."""
        from safetensors import SafetensorError
        from safetensors.numpy import load

        try:
            t = load(self.read(VECTORS_FILE))
        except (SafetensorError, OSError, ValueError) as e:
            raise CorruptArtifactError(f"cannot read {self.path / VECTORS_FILE}: {e}") from e
        missing = [n for n in (*self.vectors, *self.mandatory) if n not in t]
        if missing:
            raise CorruptArtifactError(f"{self.path / VECTORS_FILE} lacks vectors {missing}")
        bank = np.stack([t[n].reshape(-1) for n in self.vectors]).astype(np.float32)
        mand = None
        if self.mandatory:
            mand = sum(
                (np.float32(w) * t[n] for n, w in self.mandatory.items()), np.zeros(self.iospec.shape, np.float32)
            )
        return bank, mand

    @classmethod
    def load(cls, path: str | os.PathLike) -> Bundle:
        """Read ``bundle.json`` and verify the sha256 of every file it lists."""
        path = Path(path)
        if not path.is_dir():
            raise ArtifactError(f"bundle folder not found: {path}")
        manifest = BundleManifest.from_dict(read_json(path / BUNDLE_FILE, "bundle manifest"), str(path / BUNDLE_FILE))
        for name, want in manifest.files.items():
            f = path / name
            if not f.is_file():
                raise ArtifactError(f"bundle file missing: {f}")
            got = sha256_file(f)
            if got != want:
                raise CorruptArtifactError(
                    f"{f} has sha256 {got[:16]}…, the bundle records {want[:16]}…: the file was modified"
                )
        return cls(path, manifest)


def write_bundle(
    out: str | os.PathLike, files: dict[str, bytes], manifest: BundleManifest, *, overwrite: bool = False
) -> Bundle:
    """Write ``files`` and ``bundle.json`` (with their hashes) into a temporary folder, then rename it to ``out``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ArtifactError(f"bundle folder {out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        manifest = replace(manifest, files={name: sha256_file(tmp / name) for name in files})
        atomic_write_json(tmp / BUNDLE_FILE, manifest.to_dict())
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle.load(out)


def add_bundle_file(bundle: Bundle, name: str, data: bytes, **changes: Any) -> Bundle:
    """Add (or replace) one file of an existing bundle, e.g. a TensorRT plan, and record its hash;
    ``changes`` are manifest fields to set at the same time (``tensorrt=TensorRTBuild(...)``).

    The file is written atomically first, then the manifest.
    """
    atomic_write(bundle.path / name, lambda p: p.write_bytes(data))
    files = {**bundle.manifest.files, name: sha256_file(bundle.path / name)}
    atomic_write_json(bundle.path / BUNDLE_FILE, replace(bundle.manifest, files=files, **changes).to_dict())
    return Bundle.load(bundle.path)
