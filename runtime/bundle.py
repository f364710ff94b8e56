"""The bundle: what the runtime loads. A folder with ``model.onnx`` and ``bundle.json``.

``bundle.json`` holds the schema version, a bundle id, the IOSpec, the selectable vector names in
coefficient order (K), the mandatory vectors baked into the graph with their weights, the coefficient
range, the model fingerprint, the source bank's manifest entries for the selectable vectors, and the
sha256 of every other file. Written into a temporary sibling folder and renamed into place; loading
verifies every hash.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ArtifactError, CorruptArtifactError
from .files import atomic_write, atomic_write_json, read_json, sha256_file
from .iospec import IOSpec

__all__ = ["Bundle", "BUNDLE_FILE", "BUNDLE_SCHEMA_VERSION", "write_bundle", "add_bundle_file"]

BUNDLE_FILE = "bundle.json"
MODEL_ONNX = "model.onnx"
MODEL_PLAN = "model.plan"
VECTORS_FILE = "vectors.safetensors"
CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_JSON = "classifier.json"
CLASSIFIER_ONNX = "classifier.onnx"
BUNDLE_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Bundle:
    path: Path
    bundle_id: str
    iospec: IOSpec
    vectors: tuple[str, ...]
    mandatory: dict[str, float]
    coeff_range: tuple[float, float] | None
    fingerprint: str
    record: dict[str, Any] = field(repr=False)

    @property
    def onnx_path(self) -> Path:
        return self.path / MODEL_ONNX

    @property
    def plan_path(self) -> Path:
        return self.path / MODEL_PLAN

    @property
    def has_torch_classifier(self) -> bool:
        """True when the bundle carries the PyTorch weights (exported from a model folder, not grafted)."""
        return CLASSIFIER_WEIGHTS in self.record.get("files", {})

    def vector_arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The selectable vectors as [K, C·H·W] (coefficient order) and the summed mandatory δ [C, H, W] or None."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            t = load_file(str(self.path / VECTORS_FILE))
        except (SafetensorError, OSError, ValueError) as e:
            raise CorruptArtifactError(f"cannot read {self.path / VECTORS_FILE}: {e}") from e
        missing = [n for n in (*self.vectors, *self.mandatory) if n not in t]
        if missing:
            raise CorruptArtifactError(f"{self.path / VECTORS_FILE} lacks vectors {missing}")
        bank = np.stack([t[n].reshape(-1) for n in self.vectors]).astype(np.float32)
        mand = None
        if self.mandatory:
            mand = sum((np.float32(w) * t[n] for n, w in self.mandatory.items()), np.zeros(self.iospec.shape, np.float32))
        return bank, mand

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Bundle":
        path = Path(path)
        if not path.is_dir():
            raise ArtifactError(f"bundle folder not found: {path}")
        rec = read_json(path / BUNDLE_FILE, "bundle record")
        if not isinstance(rec, dict) or rec.get("kind") != "forgetrt.bundle":
            raise CorruptArtifactError(f"{path / BUNDLE_FILE} is not a ForgetRT bundle record")
        if rec.get("schema_version") != BUNDLE_SCHEMA_VERSION:
            raise CorruptArtifactError(f"{path / BUNDLE_FILE}: unsupported schema_version {rec.get('schema_version')!r}")
        for name, want in (rec.get("files") or {}).items():
            f = path / name
            if not f.is_file():
                raise ArtifactError(f"bundle file missing: {f}")
            got = sha256_file(f)
            if got != want:
                raise CorruptArtifactError(f"{f} has sha256 {got[:16]}…, the bundle records {want[:16]}…: the file was modified")
        try:
            cr = rec.get("coeff_range")
            return cls(
                path=path,
                bundle_id=str(rec["bundle_id"]),
                iospec=IOSpec.from_dict(rec["iospec"]),
                vectors=tuple(rec["vectors"]),
                mandatory={str(k): float(v) for k, v in (rec.get("mandatory") or {}).items()},
                coeff_range=(float(cr[0]), float(cr[1])) if cr else None,
                fingerprint=str(rec["model_fingerprint"]),
                record=rec,
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CorruptArtifactError(f"{path / BUNDLE_FILE} is malformed: {e!r}") from e


def write_bundle(out: str | os.PathLike, files: dict[str, bytes], record: dict[str, Any], *, overwrite: bool = False) -> Bundle:
    """Write ``files`` and ``bundle.json`` (with their hashes) into a temporary folder, then rename it to ``out``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ArtifactError(f"bundle folder {out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        rec = {"schema_version": BUNDLE_SCHEMA_VERSION, "kind": "forgetrt.bundle", **record,
               "files": {name: sha256_file(tmp / name) for name in files}}
        atomic_write_json(tmp / BUNDLE_FILE, rec)
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


def add_bundle_file(bundle: Bundle, name: str, data: bytes, extra: dict[str, Any] | None = None) -> Bundle:
    """Add (or replace) one file of an existing bundle, e.g. a TensorRT plan, and record its hash.

    The file is written atomically first, then the record; ``extra`` is merged into the record.
    """
    atomic_write(bundle.path / name, lambda p: p.write_bytes(data))
    rec = dict(bundle.record)
    rec["files"] = {**rec.get("files", {}), name: sha256_file(bundle.path / name)}
    rec.update(extra or {})
    atomic_write_json(bundle.path / BUNDLE_FILE, rec)
    return Bundle.load(bundle.path)
