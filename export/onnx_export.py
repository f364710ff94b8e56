"""``forgetrt export onnx`` and ``forgetrt export classifier``.

A bundle is exported either from a model folder (the PyTorch classifier, fingerprint-checked against
the bank) or grafted onto an existing ONNX classifier (``from_onnx``). For a graft, the bank's
fingerprint cannot be recomputed from an ONNX file (the exporter folds and renames weights), so the
policy is: the ONNX file's sha256 must be one the bank recorded when ForgetRT exported that classifier
(``forgetrt export classifier --bank``), or the caller passes ``allow_unverified_model=True`` and the
bundle records ``"model_verified": false``.

Nothing is written unless onnxruntime reproduces the reference within tolerance.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from forgetrt.runtime.bank import VectorBank
from forgetrt.runtime.bundle import (
    CLASSIFIER_JSON,
    CLASSIFIER_ONNX,
    CLASSIFIER_WEIGHTS,
    MODEL_ONNX,
    VECTORS_FILE,
    Bundle,
    BundleManifest,
    graph_metadata,
    vector_sha256,
    write_bundle,
)
from forgetrt.runtime.errors import ArtifactError, CorruptArtifactError, InvalidInputError, MismatchError, unknown
from forgetrt.runtime.files import atomic_write_bytes, ensure_writable_dir, ensure_writable_file, read_json, sha256_file
from forgetrt.runtime.guards import DEFAULT_CANCEL_THRESHOLD, check_cancellation
from forgetrt.runtime.model_folder import MODEL_MANIFEST, MODEL_WEIGHTS, load_model

from .onnx_graph import classifier_io, fuse_classifier
from .parity import compare_logits, onnxruntime_logits, parity_inputs, reference_logits
from .torch_onnx import check_opset

__all__ = ["export_onnx", "export_classifier", "load_onnx_file", "read_policies"]


def load_onnx_file(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and check an ONNX file; a missing, unparsable or invalid file is a typed error."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # onnx raises DecodeError, ValidationError, ... without a common base
        raise CorruptArtifactError(
            f"{path} is not a valid ONNX model: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
    return model


def _guard_classes(bank: VectorBank, mandatory: Mapping[str, float]) -> tuple[int, ...]:
    classes: set[int] = set()
    for n in mandatory:
        f = bank.entry(n).forgets
        if f.get("kind") != "class":
            raise InvalidInputError(
                f"--guard needs class-wise mandatory vectors; {n!r} forgets {f.get('kind', 'something else')}"
            )
        classes.update(int(c) for c in f["classes"])
    return tuple(sorted(classes))


def read_policies(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """Named compositions from a JSON file: ``{"eu": {"forget-3": 1.0}}`` (checked against the bank at export)."""
    pol = read_json(path, "policies file")
    if not isinstance(pol, dict) or not all(isinstance(v, dict) for v in pol.values()):
        raise InvalidInputError(f"{path} must hold {{policy: {{vector: weight}}}}")
    return pol


def _policy_weights(name: str, weights: Any, coeff_range: tuple[float, float] | None) -> dict[str, float]:
    """A policy's weights: finite numbers inside the coefficient range (a policy no request could use is refused)."""
    if not isinstance(weights, Mapping):
        raise InvalidInputError(f"policy {name!r} must map vector names to weights")
    out = {}
    for n, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise InvalidInputError(f"policy {name!r}: the weight of {n!r} must be a number, got {str(w)[:40]!r}")
        try:
            w = float(w)
        except OverflowError:
            raise InvalidInputError(f"policy {name!r}: the weight of {n!r} is not a finite number") from None
        if not math.isfinite(w):
            raise InvalidInputError(f"policy {name!r}: the weight of {n!r} is not a finite number")
        if coeff_range is not None and not coeff_range[0] <= w <= coeff_range[1]:
            raise InvalidInputError(
                f"policy {name!r}: the weight {w} of {n!r} is outside the coefficient range {list(coeff_range)}"
            )
        out[str(n)] = w
    return out


def export_classifier(
    model_dir: str | os.PathLike, out: str | os.PathLike, *, banks: Sequence[str | os.PathLike] = (), opset: int = 17
) -> dict[str, Any]:
    """Write the bare classifier as ONNX and record its sha256 in each bank (which must match the model)."""
    from .torch_onnx import classifier_to_onnx

    check_opset(opset)
    ensure_writable_file(out, "classifier ONNX file")
    model, info = load_model(model_dir, "cpu")
    opened = []
    for b in banks:
        bank = VectorBank.load(b)
        bank.check_model(info.fingerprint, info.iospec, what=f"model {model_dir}")
        opened.append(bank)
    data = classifier_to_onnx(model, info.iospec, opset).SerializeToString()
    atomic_write_bytes(out, data)
    sha = sha256_file(out)
    for bank in opened:
        if sha not in bank.onnx_sha256:
            bank.onnx_sha256.append(sha)
            bank.save()
    return {"onnx": str(out), "sha256": sha, "banks": [str(b) for b in banks]}


def _safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save(
        {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
        metadata={"format": "forgetrt.bundle_vectors"},
    )


def export_onnx(
    bank_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model_dir: str | os.PathLike | None = None,
    from_onnx: str | os.PathLike | None = None,
    allow_unverified_model: bool = False,
    vectors: Sequence[str] | None = None,
    mandatory: Mapping[str, float] | None = None,
    coeff_range: tuple[float, float] | None = None,
    opset: int = 17,
    policies: Mapping[str, Mapping[str, float]] | None = None,
    overwrite: bool = False,
    guard: bool = False,
    cancel_threshold: float = DEFAULT_CANCEL_THRESHOLD,
) -> dict[str, Any]:
    """Export the fused graph into a bundle folder; fails, writing nothing, on any mismatch.

    With ``mandatory`` vectors, the selectable ones must not be able to cancel them within the
    coefficient range (:func:`forgetrt.runtime.guards.check_cancellation`, ``cancel_threshold``), and
    the graph gets no overridable bank input. ``guard``: also mask the classes the mandatory vectors
    forget at the output (class-wise mandatory vectors only), so no input can bring them back.
    """
    if (model_dir is None) == (from_onnx is None):
        raise InvalidInputError(
            "give exactly one of --model (a ForgetRT model folder) or --from-onnx (a classifier .onnx)"
        )
    if Path(out).exists() and not overwrite:
        raise ArtifactError(f"bundle folder {out} already exists; pass --overwrite to replace it")
    check_opset(opset)
    ensure_writable_dir(out, "bundle folder")  # a file, device or pipe there is refused, never replaced
    bank = VectorBank.load(bank_dir)
    mandatory = {str(k): float(v) for k, v in (mandatory or {}).items()}
    bad = [k for k, v in mandatory.items() if not (math.isfinite(v) and v != 0)]
    if bad:
        raise InvalidInputError(
            f"mandatory weights must be finite and non-zero, got {[(k, mandatory[k]) for k in bad]}"
        )
    if not 0.0 <= cancel_threshold <= 1.0:
        raise InvalidInputError(f"cancel threshold must be in [0, 1], got {cancel_threshold}")
    if guard and not mandatory:
        raise InvalidInputError("--guard masks the classes the mandatory vectors forget: give --mandatory")
    names = [str(v) for v in vectors] if vectors else [n for n in bank.names if n not in mandatory]
    for n in [*names, *mandatory]:
        if n not in bank:
            raise unknown("vector", n, bank.names)
    both = sorted(set(names) & set(mandatory))
    if both:
        # refused: a request could cancel a mandatory vector with a negative coefficient on its selectable copy
        raise InvalidInputError(
            f"vectors {both} are both mandatory and selectable; a mandatory vector cannot be selectable"
        )
    if not names:
        raise InvalidInputError("no selectable vector left to export")
    if len(set(names)) != len(names):
        raise InvalidInputError(f"vector names repeat: {names}")
    policies = {str(k): _policy_weights(str(k), v, coeff_range) for k, v in (policies or {}).items()}
    for pname, weights in policies.items():
        bad = [n for n in weights if n not in names]
        if bad:
            raise unknown(f"vector in policy {pname!r}:", bad[0], names)
    spec = bank.iospec
    files: dict[str, bytes] = {}
    if model_dir is not None:
        from forgetrt.runtime.architectures import TORCH_EXPORT

        from .torch_onnx import classifier_to_onnx

        model, info = load_model(model_dir, "cpu")
        bank.check_model(info.fingerprint, info.iospec, what=f"model {model_dir}")
        classifier = classifier_to_onnx(model, spec, opset)
        # a torch.export bundle's own reference is the ONNX of its classifier: check the export against the program
        program = model if info.arch == TORCH_EXPORT else None
        if info.arch == TORCH_EXPORT:
            # the program (a .pt2) never travels into a bundle: the bare classifier's ONNX stands in as the
            # reference (as for a grafted bundle), so serving never loads a program file
            files[CLASSIFIER_ONNX] = classifier.SerializeToString()
        else:
            files[CLASSIFIER_WEIGHTS] = (Path(model_dir) / MODEL_WEIGHTS).read_bytes()
            files[CLASSIFIER_JSON] = (Path(model_dir) / MODEL_MANIFEST).read_bytes()
        source, arch, verified, clf_sha = "model", info.arch, True, None
    else:
        assert from_onnx is not None
        program = None
        classifier = load_onnx_file(from_onnx)
        clf_sha = sha256_file(from_onnx)
        verified = clf_sha in bank.onnx_sha256
        if not verified and not allow_unverified_model:
            raise MismatchError(
                f"{from_onnx} (sha256 {clf_sha[:16]}…) is not a classifier this bank was verified against "
                f"(bank {bank_dir} was trained for model {bank.fingerprint[:16]}…, recorded ONNX files: "
                f"{[s[:16] + '…' for s in bank.onnx_sha256] or 'none'}); export it with `forgetrt export classifier "
                "--bank`, or pass --allow-unverified-model to graft anyway"
            )
        classifier_io(classifier)
        files[CLASSIFIER_ONNX] = Path(from_onnx).read_bytes()
        source, arch = "onnx", bank.arch
    stacked = bank.stack(names)
    mand = bank.combine(mandatory) if mandatory else None
    cancel = None
    if mand is not None:
        # a selectable combination inside the allowed range must not be able to cancel the mandatory δ
        cancel = check_cancellation(
            stacked,
            mand,
            coeff_range,
            cancel_threshold,
            selectable_names=tuple(names),
            mandatory_vectors={n: np.float32(w) * bank.get(n) for n, w in mandatory.items()},
        )
    guard_classes = _guard_classes(bank, mandatory) if guard else ()
    manifest = BundleManifest(
        bundle_id=uuid.uuid4().hex[:12],
        iospec=spec,
        model_fingerprint=bank.fingerprint,
        vectors=tuple(names),
        source=source,
        arch=arch,
        model_verified=verified,
        opset=0,
        mandatory=mandatory,
        coeff_range=coeff_range,
        policies=policies,
        bank_entries={n: bank.entry(n) for n in [*names, *mandatory]},
        classifier_onnx_sha256=clf_sha,
        guard_classes=guard_classes,
        cancel_threshold=cancel_threshold if mand is not None else None,
    )
    fused = fuse_classifier(
        classifier,
        spec,
        stacked,
        vector_names=names,
        mandatory=mand,
        coeff_range=coeff_range,
        metadata=graph_metadata(manifest, {n: vector_sha256(bank.get(n)) for n in [*names, *mandatory]}),
        overridable_bank=mand is None,  # with mandatory vectors nobody may feed another bank to this graph
        guard_classes=guard_classes,
    )
    files[MODEL_ONNX] = fused.SerializeToString()
    files[VECTORS_FILE] = _safetensors_bytes({n: bank.get(n) for n in [*names, *mandatory]})
    # parity before anything is written: onnxruntime on the fused graph vs the reference
    ref = reference_logits(files, spec, stacked, mand, coeff_range, guard_classes, module=program)
    images, coeffs = parity_inputs(spec.shape, len(names))
    got = onnxruntime_logits(files[MODEL_ONNX], spec, images, coeffs)
    parity = compare_logits(got, ref(images, coeffs), "fp32", backend="onnxruntime")
    opset = next(o.version for o in fused.opset_import if o.domain in ("", "ai.onnx"))
    extra = {"cancellation_residual": cancel.residual} if cancel is not None else {}
    manifest = replace(manifest, opset=opset, parity={"onnxruntime": parity, **extra})
    bundle: Bundle = write_bundle(out, files, manifest, overwrite=overwrite)
    return {
        "bundle": str(bundle.path),
        "bundle_id": manifest.bundle_id,
        "vectors": names,
        "mandatory": mandatory,
        "source": source,
        "model_verified": verified,
        "parity": parity,
    }
