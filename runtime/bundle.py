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

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .bank import VectorEntry
from .errors import ArtifactError, CorruptArtifactError, MismatchError
from .files import atomic_write, atomic_write_json, ensure_writable_dir, read_json, sha256_file
from .guards import GUARD_LOGIT
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
    "SIGNATURE_FILE",
    "vector_sha256",
    "graph_metadata",
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
SIGNATURE_FILE = "bundle.sig"
#: 2: the graph's metadata binds it to the manifest (vector hashes, mandatory weights, range, guard)
BUNDLE_SCHEMA_VERSION = 2
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
    #: the output guard: classes whose logits the graph pushes to GUARD_LOGIT (never predicted)
    guard_classes: tuple[int, ...] = ()
    #: the cancellation threshold export checked the selectable vectors against (mandatory vectors only)
    cancel_threshold: float | None = None
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["iospec"] = self.iospec.to_dict()
        d["vectors"] = list(self.vectors)
        d["coeff_range"] = list(self.coeff_range) if self.coeff_range else None
        d["bank_entries"] = {n: e.to_dict() for n, e in self.bank_entries.items()}
        d["guard_classes"] = list(self.guard_classes)
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
                mandatory=_finite_weights(d.get("mandatory") or {}, where),
                coeff_range=(float(cr[0]), float(cr[1])) if cr else None,
                policies={str(p): _finite_weights(ws, where, "policy") for p, ws in (d.get("policies") or {}).items()},
                bank_entries={str(n): VectorEntry.from_dict(e, n) for n, e in (d.get("bank_entries") or {}).items()},
                classifier_onnx_sha256=d.get("classifier_onnx_sha256"),
                parity=dict(d.get("parity") or {}),
                tensorrt=TensorRTBuild(**{_LEGACY_TRT_KEYS.get(k, k): v for k, v in trt.items()}) if trt else None,
                guard_classes=tuple(int(c) for c in d.get("guard_classes") or ()),
                cancel_threshold=_threshold(d.get("cancel_threshold"), where),
                files={str(k): str(v) for k, v in (d.get("files") or {}).items()},
            )
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as e:
            if isinstance(e, CorruptArtifactError):
                raise
            raise CorruptArtifactError(f"{where} is malformed: {e!r}") from e


def _finite_weights(raw: Any, where: str, what: str = "mandatory") -> dict[str, float]:
    if not isinstance(raw, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw.values()
    ):
        raise CorruptArtifactError(f"{where}: {what} weights must be a mapping of names to numbers")
    out = {str(k): float(v) for k, v in raw.items()}
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise CorruptArtifactError(f"{where}: {what} weights of {bad} are not finite")
    return out


def _threshold(raw: Any, where: str) -> float | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not 0 <= float(raw) <= 1:
        raise CorruptArtifactError(f"{where}: cancel_threshold must be a number in [0, 1], got {str(raw)[:40]}")
    return float(raw)


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and not name.startswith(".")


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
        where = f"{self.path / CLASSIFIER_JSON}"
        try:
            raw = json.loads(self.read(CLASSIFIER_JSON))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CorruptArtifactError(f"{where} is not valid JSON: {str(e)[:200]}") from None
        return ModelManifest.from_dict(raw, where)

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

    def _tensors(self) -> dict[str, np.ndarray]:
        from safetensors import SafetensorError
        from safetensors.numpy import load

        try:
            t = load(self.read(VECTORS_FILE))
        except (SafetensorError, OSError, ValueError) as e:
            raise CorruptArtifactError(f"cannot read {self.path / VECTORS_FILE}: {e}") from e
        names = (*self.vectors, *self.mandatory)
        missing = [n for n in names if n not in t]
        if missing:
            raise CorruptArtifactError(f"{self.path / VECTORS_FILE} lacks vectors {missing}")
        bad = [n for n in names if t[n].dtype != np.float32 or t[n].shape != tuple(self.iospec.shape)]
        if bad:
            raise CorruptArtifactError(f"{self.path / VECTORS_FILE}: {bad} are not float32 {tuple(self.iospec.shape)}")
        return t

    def mandatory_vectors(self) -> dict[str, np.ndarray]:
        """Each mandatory vector times its weight, [C, H, W]."""
        t = self._tensors()
        return {n: np.float32(w) * t[n] for n, w in self.mandatory.items()}

    def vector_arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The selectable vectors as [K, C·H·W] (coefficient order) and the summed mandatory δ [C, H, W] or None."""
        t = self._tensors()
        bank = np.stack([t[n].reshape(-1) for n in self.vectors]).astype(np.float32)
        mand = None
        if self.mandatory:
            mand = sum(
                (np.float32(w) * t[n] for n, w in self.mandatory.items()), np.zeros(self.iospec.shape, np.float32)
            )
        return bank, mand

    @classmethod
    def load(cls, path: str | os.PathLike, *, verify_key: str | os.PathLike | None = None) -> Bundle:
        """Read ``bundle.json``, verify the sha256 of every file it lists and the graph's binding to it;
        with ``verify_key``, first the signature (``bundle.sig``) against that public key."""
        path = Path(path)
        if not path.is_dir():
            raise ArtifactError(f"bundle folder not found: {path}")
        if verify_key is not None:
            from .signing import verify_bundle

            verify_bundle(path, verify_key)
        manifest = BundleManifest.from_dict(read_json(path / BUNDLE_FILE, "bundle manifest"), str(path / BUNDLE_FILE))
        bad = [n for n in manifest.files if not _plain_name(n)]
        if bad:
            raise CorruptArtifactError(f"{path / BUNDLE_FILE} lists file names outside the bundle folder: {bad}")
        for required in (MODEL_ONNX, VECTORS_FILE):
            if required not in manifest.files:
                raise CorruptArtifactError(f"{path / BUNDLE_FILE} does not list {required}")
        extra = sorted(p.name for p in path.iterdir() if p.name not in (*manifest.files, BUNDLE_FILE, SIGNATURE_FILE))
        if extra:
            raise CorruptArtifactError(f"bundle {path} holds files its manifest does not list: {extra}")
        for name, want in manifest.files.items():
            f = path / name
            if not f.is_file() or f.is_symlink():
                raise ArtifactError(f"bundle file missing: {f}")
            got = sha256_file(f)
            if got != want:
                raise CorruptArtifactError(
                    f"{f} has sha256 {got[:16]}…, the bundle records {want[:16]}…: the file was modified"
                )
        bundle = cls(path, manifest)
        bundle.check_graph()
        return bundle

    def _check_classifier(self) -> None:
        """The PyTorch classifier shipped beside the graph (if any) is the fingerprinted model (no torch needed)."""
        if not self.has_torch_classifier:
            return
        from safetensors import SafetensorError
        from safetensors.numpy import load

        from .files import weights_fingerprint

        manifest = self.classifier_manifest()
        try:
            fp = weights_fingerprint(load(self.read(CLASSIFIER_WEIGHTS)))
        except (SafetensorError, ValueError) as e:
            raise CorruptArtifactError(f"cannot read {self.path / CLASSIFIER_WEIGHTS}: {e}") from e
        if not (fp == manifest.fingerprint == self.fingerprint):
            raise MismatchError(
                f"bundle {self.path}: the classifier's weights ({fp[:16]}…), its manifest "
                f"({manifest.fingerprint[:16]}…) and the bundle ({self.fingerprint[:16]}…) do not name the same model"
            )

    def vector_hashes(self) -> dict[str, str]:
        """sha256 of each vector's float32 bytes in ``vectors.safetensors`` (selectable and mandatory)."""
        tensors = self._tensors()
        return {n: vector_sha256(tensors[n]) for n in (*self.vectors, *self.mandatory)}

    def check_graph(self) -> None:
        """Refuse a bundle whose ``model.onnx`` does not agree with its manifest: the bundle id, vector
        order, mandatory names and weights, vector hashes, coefficient range and guard recorded in the
        graph's metadata; its bank and mandatory constants equal to ``vectors.safetensors``; and, with
        mandatory vectors, no bank input a caller could override."""

        try:
            import onnx
            from onnx import numpy_helper

            model = onnx.load(str(self.onnx_path), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - onnx raises DecodeError and others without a common base
            raise CorruptArtifactError(f"{self.onnx_path} is not a readable ONNX model: {type(e).__name__}") from e
        if any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer):
            raise CorruptArtifactError(f"{self.onnx_path} keeps tensors in external files: a bundle is self-contained")
        meta = {p.key: p.value for p in model.metadata_props}
        m = self.manifest
        want = graph_metadata(m, self.vector_hashes())
        differ = [k for k, v in want.items() if meta.get(k) != v]
        if differ:
            raise MismatchError(
                f"bundle {self.path}: {BUNDLE_FILE} and the graph's metadata disagree on {differ} "
                "(an edited manifest, a swapped model.onnx, or a bundle exported before graph binding: re-export it)"
            )
        inits = {i.name: i for i in model.graph.initializer}
        stacked, mand = self.vector_arrays()
        if "forget_bank" not in inits or not np.array_equal(numpy_helper.to_array(inits["forget_bank"]), stacked):
            raise MismatchError(f"bundle {self.path}: the graph's forget_bank is not the manifest's selectable vectors")
        graph_mand = numpy_helper.to_array(inits["forget_mandatory"])[0] if "forget_mandatory" in inits else None
        if (mand is None) != (graph_mand is None) or (
            mand is not None and not np.allclose(graph_mand, mand, rtol=1e-6, atol=1e-7)
        ):
            raise MismatchError(f"bundle {self.path}: the graph's mandatory δ is not the manifest's mandatory vectors")
        if mand is not None and any(i.name == "forget_bank" for i in model.graph.input):
            raise MismatchError(
                f"bundle {self.path} has mandatory vectors but its graph lets a caller override forget_bank (which "
                "could cancel them): re-export it"
            )
        self._check_classifier()
        mask = numpy_helper.to_array(inits["forget_guard_mask"]) if "forget_guard_mask" in inits else None
        if m.guard_classes:
            want_mask = np.zeros(m.iospec.num_classes, np.float32)
            want_mask[list(m.guard_classes)] = GUARD_LOGIT
            if mask is None or mask.dtype != np.float32 or not np.array_equal(mask, want_mask):
                raise MismatchError(
                    f"bundle {self.path}: the graph's output guard is not the manifest's {list(m.guard_classes)} "
                    f"at {GUARD_LOGIT:g}"
                )
        elif mask is not None:
            raise MismatchError(f"bundle {self.path}: the graph has an output guard its manifest does not record")
        if m.coeff_range is not None:
            lo, hi = (
                numpy_helper.to_array(inits[n]) if n in inits else None for n in ("forget_coeff_lo", "forget_coeff_hi")
            )
            if lo is None or hi is None or (float(lo), float(hi)) != tuple(float(np.float32(v)) for v in m.coeff_range):
                raise MismatchError(f"bundle {self.path}: the graph's coefficient clip is not {list(m.coeff_range)}")
        problem = _prefix_wiring_problem(model, m)
        if problem:
            raise MismatchError(f"bundle {self.path}: the graph's forget prefix is not wired as exported: {problem}")
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        if opset != m.opset:
            raise MismatchError(f"bundle {self.path}: {BUNDLE_FILE} says opset {m.opset}, the graph {opset}")


def _prefix_wiring_problem(model: Any, m: BundleManifest) -> str | None:
    """What is wrong with how the forget prefix and guard are wired into ``model`` (None: as export wires
    them). Initializers are compared elsewhere; this checks that they are the ones used, and that nothing
    reaches the classifier around them (the raw image, the unmasked logits, a second producer)."""
    from onnx import numpy_helper

    spec = m.iospec
    g = model.graph
    init_names = [i.name for i in g.initializer]
    if len(set(init_names)) != len(init_names):
        return "an initializer name repeats"
    want_inputs = [spec.image_name, spec.coeffs_name] + ([] if m.mandatory else ["forget_bank"])
    if sorted(i.name for i in g.input) != sorted(want_inputs):
        return f"graph inputs {[i.name for i in g.input]}, expected {want_inputs}"
    if [o.name for o in g.output] != [spec.output_name]:
        return f"graph outputs {[o.name for o in g.output]}, expected [{spec.output_name!r}]"
    coeffs = spec.coeffs_name
    want = []
    if m.coeff_range is not None:
        want.append(("forget_clip", "Clip", [coeffs, "forget_coeff_lo", "forget_coeff_hi"], ["forget_coeffs_clipped"]))
        coeffs = "forget_coeffs_clipped"
    perturbed = "forget_perturbed" if m.mandatory else "forget_input"
    want += [
        ("forget_matmul", "MatMul", [coeffs, "forget_bank"], ["forget_delta_flat"]),
        ("forget_reshape", "Reshape", ["forget_delta_flat", "forget_delta_shape"], ["forget_delta"]),
        ("forget_input_add", "Add", [spec.image_name, "forget_delta"], [perturbed]),
    ]
    if m.mandatory:
        want.append(("forget_mandatory_add", "Add", ["forget_perturbed", "forget_mandatory"], ["forget_input"]))
    if m.guard_classes:
        want.append(("forget_guard_add", "Add", ["forget_unguarded_logits", "forget_guard_mask"], [spec.output_name]))
    by_name: dict[str, list[Any]] = {}
    producers: dict[str, int] = {}
    consumers: dict[str, list[str]] = {}
    for node in g.node:
        by_name.setdefault(node.name, []).append(node)
        for o in node.output:
            producers[o] = producers.get(o, 0) + 1
        for i in node.input:
            consumers.setdefault(i, []).append(node.name)
    for name, op, ins, outs in want:
        nodes = by_name.get(name, [])
        if len(nodes) != 1 or nodes[0].op_type != op or list(nodes[0].input) != ins or list(nodes[0].output) != outs:
            return f"node {name} is not {op}({', '.join(ins)}) -> {', '.join(outs)}"
        for o in outs:
            if producers.get(o) != 1:
                return f"{o} has {producers.get(o, 0)} producers"
    if any(o in set(init_names) for o in producers):
        return "a node overwrites an initializer"
    only = {spec.image_name: "forget_input_add", "forget_delta": "forget_input_add"}
    if m.mandatory:
        only["forget_perturbed"] = "forget_mandatory_add"
    for tensor, node_name in only.items():
        if consumers.get(tensor, []) != [node_name]:
            return f"{tensor} is read by {consumers.get(tensor, [])}, only {node_name} may read it"
    if not consumers.get("forget_input"):
        return "the classifier does not read forget_input"
    shape_init = next((i for i in g.initializer if i.name == "forget_delta_shape"), None)
    shape = numpy_helper.to_array(shape_init) if shape_init is not None else np.zeros(0)
    if shape.tolist() != [-1, *spec.shape]:
        return f"forget_delta_shape is {shape.tolist()}, expected {[-1, *spec.shape]}"
    return None


def vector_sha256(v: np.ndarray) -> str:
    """sha256 of a vector's float32 bytes (C order): what the graph's metadata records per vector."""
    return hashlib.sha256(np.ascontiguousarray(v, np.float32).tobytes()).hexdigest()


#: manifest fields that change after export (recorded results, added engines, file hashes): not bound
_UNBOUND_FIELDS = ("files", "parity", "tensorrt", "opset", "schema_version", "kind")


def manifest_digest(m: BundleManifest) -> str:
    """sha256 of everything the manifest says about what the bundle computes (every field but
    :data:`_UNBOUND_FIELDS`), in the form a reload gives (so ints and floats hash alike)."""
    d = BundleManifest.from_dict(m.to_dict()).to_dict()
    bound = {k: v for k, v in d.items() if k not in _UNBOUND_FIELDS}
    return hashlib.sha256(json.dumps(bound, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def graph_metadata(m: BundleManifest, hashes: dict[str, str]) -> dict[str, str]:
    """What export writes into the graph's ``metadata_props`` and loading compares with the manifest."""
    return {
        "forgetrt.manifest_sha256": manifest_digest(m),
        "forgetrt.bundle_id": m.bundle_id,
        "forgetrt.vectors": ",".join(m.vectors),
        "forgetrt.model_fingerprint": m.model_fingerprint,
        "forgetrt.mandatory": json.dumps(m.mandatory, sort_keys=True),
        "forgetrt.vector_sha256": json.dumps(hashes, sort_keys=True),
        "forgetrt.coeff_range": json.dumps(list(m.coeff_range) if m.coeff_range else None),
        "forgetrt.guard": json.dumps(list(m.guard_classes)),
    }


def write_bundle(
    out: str | os.PathLike, files: dict[str, bytes], manifest: BundleManifest, *, overwrite: bool = False
) -> Bundle:
    """Write ``files`` and ``bundle.json`` (with their hashes) into a temporary folder, then rename it to ``out``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ArtifactError(f"bundle folder {out} already exists; pass --overwrite to replace it")
    ensure_writable_dir(out, "bundle folder")  # --overwrite replaces a folder, never a file, device or pipe
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
