"""The vector bank: named forget vectors for one frozen classifier.

On disk a bank is a folder::

    vectors.safetensors   name -> float32 [C, H, W]
    manifest.json         schema_version, model fingerprint + arch, IOSpec, sha256 of the tensors
                          file, and per vector: what it forgets, its recipe, metrics, composition

No pickle: tensors go through safetensors, everything else through JSON. Saving writes the tensors
file first and the manifest last, each atomically; the manifest records the tensors file's sha256,
so a bank interrupted between the two renames is detected as inconsistent instead of half-loaded.

Example::

    bank = VectorBank.load("runs/bank")
    bank.check_model(fingerprint, iospec)   # MismatchError if trained for another model
    delta = bank.combine({"forget-0": 1.0, "forget-3": 1.0})
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArtifactError, CorruptArtifactError, InvalidInputError, MismatchError, unknown
from .files import atomic_write, atomic_write_json, read_json, sha256_file
from .iospec import IOSpec

__all__ = [
    "VectorBank",
    "BankManifest",
    "VectorEntry",
    "BANK_SCHEMA_VERSION",
    "VECTORS_FILE",
    "MANIFEST_FILE",
    "validate_vector_name",
]

BANK_SCHEMA_VERSION = 1
VECTORS_FILE = "vectors.safetensors"
MANIFEST_FILE = "manifest.json"
_KIND = "forgetrt.vector_bank"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


def validate_vector_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidInputError(
            f"invalid vector name {name!r}: use 1-128 characters from letters, digits, '.', '_', '+', '-', "
            "starting with a letter or digit"
        )
    return name


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


@dataclass(frozen=True)
class VectorEntry:
    """The manifest record of one vector: what it forgets (a ``ForgetSpec`` description, e.g.
    ``{"kind": "class", "classes": [3], "labels": ["cat"]}``), how it was made, and its measurements."""

    forgets: dict[str, Any]
    recipe: dict[str, Any]
    created: str
    norm_l2: float
    metrics: dict[str, Any] | None = None
    #: for a composed vector: the coefficients over the vectors it was built from
    composition: dict[str, float] | None = None

    @property
    def composed(self) -> bool:
        return self.composition is not None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: Any, name: str = "?") -> VectorEntry:
        if not isinstance(d, dict):
            raise CorruptArtifactError(f"manifest entry of vector {name!r} is not an object")
        try:
            comp = d.get("composition")
            return cls(
                forgets=dict(d.get("forgets") or {}),
                recipe=dict(d.get("recipe") or {}),
                created=str(d.get("created", "")),
                norm_l2=float(d.get("norm_l2", 0.0)),
                metrics=None if d.get("metrics") is None else dict(d["metrics"]),
                composition=None if comp is None else {str(k): float(v) for k, v in comp.items()},
            )
        except (TypeError, ValueError, AttributeError) as e:
            raise CorruptArtifactError(f"manifest entry of vector {name!r} is malformed: {e}") from e


@dataclass(frozen=True)
class BankManifest:
    """What ``manifest.json`` records: the model the bank belongs to, the IOSpec, the sha256 of the
    tensors file and one :class:`VectorEntry` per vector, in the bank's order."""

    fingerprint: str
    arch: str
    iospec: IOSpec
    vectors_sha256: str
    entries: dict[str, VectorEntry]
    #: classifier ONNX files exported from the fingerprinted model (the verified way to graft onto ONNX)
    onnx_sha256: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": BANK_SCHEMA_VERSION,
            "kind": _KIND,
            "model": {"fingerprint": self.fingerprint, "arch": self.arch, "onnx_sha256": list(self.onnx_sha256)},
            "iospec": self.iospec.to_dict(),
            "vectors_sha256": self.vectors_sha256,
            "vectors": {name: e.to_dict() for name, e in self.entries.items()},
        }

    @classmethod
    def from_dict(cls, m: Any, where: str = MANIFEST_FILE) -> BankManifest:
        if not isinstance(m, dict) or m.get("kind") != _KIND:
            raise CorruptArtifactError(f"{where} is not a ForgetRT vector bank manifest")
        if m.get("schema_version") != BANK_SCHEMA_VERSION:
            raise CorruptArtifactError(
                f"{where}: schema_version {m.get('schema_version')!r} is not supported (expected {BANK_SCHEMA_VERSION})"
            )
        try:
            return cls(
                fingerprint=str(m["model"]["fingerprint"]),
                arch=str(m["model"]["arch"]),
                iospec=IOSpec.from_dict(m.get("iospec") or {}),
                vectors_sha256=str(m["vectors_sha256"]),
                entries={str(n): VectorEntry.from_dict(e, n) for n, e in dict(m["vectors"]).items()},
                onnx_sha256=tuple(str(x) for x in m["model"].get("onnx_sha256", [])),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, CorruptArtifactError):
                raise
            raise CorruptArtifactError(f"{where} lacks field {e}") from e


@dataclass
class VectorBank:
    """An in-memory bank; :meth:`load` and :meth:`save` move it to and from its folder."""

    fingerprint: str
    arch: str
    iospec: IOSpec
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    entries: dict[str, VectorEntry] = field(default_factory=dict)
    path: Path | None = None
    # sha256 of classifier ONNX files exported from the fingerprinted model (`forgetrt export classifier`):
    # the verified way to graft this bank onto an ONNX file instead of the PyTorch model
    onnx_sha256: list[str] = field(default_factory=list)
    #: sha256 of ``vectors.safetensors`` as last loaded or saved (verified against the manifest)
    vectors_sha256: str | None = None

    # ------------------------------------------------------------------ queries
    @property
    def names(self) -> list[str]:
        return list(self.vectors)

    def __contains__(self, name: object) -> bool:
        return name in self.vectors

    def __len__(self) -> int:
        return len(self.vectors)

    def get(self, name: str) -> np.ndarray:
        if name not in self.vectors:
            raise unknown("vector", name, self.vectors)
        return self.vectors[name]

    def entry(self, name: str) -> VectorEntry:
        self.get(name)
        return self.entries[name]

    def stack(self, names: Iterable[str] | None = None) -> np.ndarray:
        """The selected vectors as a float32 matrix [K, C·H·W], in the given order."""
        names = self.names if names is None else list(names)
        if not names:
            return np.zeros((0, self.iospec.numel), np.float32)
        return np.stack([self.get(n).reshape(-1) for n in names]).astype(np.float32, copy=False)

    def combine(self, weights: Mapping[str, float]) -> np.ndarray:
        """Forget-vector arithmetic: ``sum_i w_i * delta_i`` as float32 [C, H, W]."""
        out = np.zeros(self.iospec.shape, np.float32)
        for name, w in weights.items():
            w = float(w)
            if not math.isfinite(w):
                raise InvalidInputError(f"weight for {name!r} must be finite, got {w}")
            out += np.float32(w) * self.get(name)
        return out

    def check_model(self, fingerprint: str, iospec: IOSpec, what: str = "model") -> None:
        """Refuse to pair this bank with a classifier it was not trained for."""
        if fingerprint != self.fingerprint:
            raise MismatchError(
                f"vector bank {self.path or '(unsaved)'} was trained for the model with weights fingerprint "
                f"{self.fingerprint[:16]}… (arch {self.arch}), but {what} has fingerprint {fingerprint[:16]}…"
            )
        if tuple(iospec.shape) != tuple(self.iospec.shape):
            raise MismatchError(
                f"vector bank shape {self.iospec.shape} does not match {what} input shape {iospec.shape}"
            )

    # ------------------------------------------------------------------ edits
    def add(
        self,
        name: str,
        vector: np.ndarray,
        *,
        forgets: Mapping[str, Any],
        recipe: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
        composition: Mapping[str, float] | None = None,
        overwrite: bool = False,
    ) -> None:
        """Add (or with ``overwrite``, replace) one vector, validated before anything changes."""
        validate_vector_name(name)
        if name in self.vectors and not overwrite:
            raise InvalidInputError(f"vector {name!r} already exists in the bank; pass overwrite=True to replace it")
        arr = np.asarray(vector)
        if arr.shape != tuple(self.iospec.shape):
            raise InvalidInputError(f"vector {name!r} has shape {arr.shape}, the bank holds {tuple(self.iospec.shape)}")
        if not np.all(np.isfinite(arr)):
            raise InvalidInputError(f"vector {name!r} contains NaN or Inf")
        entry = VectorEntry(
            forgets=dict(forgets),
            recipe=dict(recipe),
            created=_now(),
            norm_l2=float(np.linalg.norm(arr.astype(np.float64))),
            metrics=None if metrics is None else dict(metrics),
            composition=None if composition is None else {k: float(v) for k, v in composition.items()},
        )
        self.vectors[name] = np.ascontiguousarray(arr, dtype=np.float32)
        self.entries[name] = entry

    # ------------------------------------------------------------------ disk
    def manifest(self, vectors_sha256: str) -> BankManifest:
        return BankManifest(
            self.fingerprint, self.arch, self.iospec, vectors_sha256, dict(self.entries), tuple(self.onnx_sha256)
        )

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the bank folder (tensors first, manifest last, each atomically)."""
        from safetensors.numpy import save_file

        target = Path(path) if path is not None else self.path
        if target is None:
            raise InvalidInputError("VectorBank.save needs a path for a bank that was never saved")
        if target.exists() and not target.is_dir():
            raise ArtifactError(f"bank path {target} exists and is not a folder")
        target.mkdir(parents=True, exist_ok=True)
        tensors = {n: np.ascontiguousarray(v, np.float32) for n, v in self.vectors.items()}
        atomic_write(
            target / VECTORS_FILE,
            lambda p: save_file(tensors, str(p), metadata={"format": "forgetrt.vector_bank"}),
        )
        self.vectors_sha256 = sha256_file(target / VECTORS_FILE)
        atomic_write_json(target / MANIFEST_FILE, self.manifest(self.vectors_sha256).to_dict())
        self.path = target
        return target

    @classmethod
    def create(cls, fingerprint: str, arch: str, iospec: IOSpec) -> VectorBank:
        return cls(fingerprint=fingerprint, arch=arch, iospec=iospec)

    @classmethod
    def exists(cls, path: str | os.PathLike) -> bool:
        return (Path(path) / MANIFEST_FILE).is_file()

    @classmethod
    def load(cls, path: str | os.PathLike) -> VectorBank:
        """Load and validate a bank folder; every defect is a typed error naming the file."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        path = Path(path)
        if not path.is_dir():
            raise ArtifactError(f"vector bank folder not found: {path}")
        man_path = path / MANIFEST_FILE
        m = BankManifest.from_dict(read_json(man_path, "bank manifest"), str(man_path))
        fingerprint, arch, iospec, entries, want_sha = m.fingerprint, m.arch, m.iospec, m.entries, m.vectors_sha256
        vec_path = path / VECTORS_FILE
        if not vec_path.is_file():
            raise ArtifactError(f"bank tensors file not found: {vec_path}")
        got_sha = sha256_file(vec_path)
        if got_sha != want_sha:
            raise CorruptArtifactError(
                f"{vec_path} has sha256 {got_sha[:16]}…, the manifest records {want_sha[:16]}…: "
                "the file was modified or the bank was not saved completely"
            )
        try:
            tensors = load_file(str(vec_path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CorruptArtifactError(f"cannot read {vec_path}: {e}") from e
        if set(tensors) != set(entries):
            raise CorruptArtifactError(
                f"{path}: tensors {sorted(tensors)} and manifest entries {sorted(entries)} differ"
            )
        vectors: dict[str, np.ndarray] = {}
        for name in entries:  # manifest order is the bank's order
            arr = tensors[name]
            if arr.dtype != np.float32 or arr.shape != tuple(iospec.shape):
                raise CorruptArtifactError(
                    f"{vec_path}: vector {name!r} is {arr.dtype} {arr.shape}, expected float32 {tuple(iospec.shape)}"
                )
            vectors[name] = arr
        return cls(
            fingerprint=fingerprint,
            arch=arch,
            iospec=iospec,
            vectors=vectors,
            entries=entries,
            path=path,
            onnx_sha256=list(m.onnx_sha256),
            vectors_sha256=want_sha,
        )
