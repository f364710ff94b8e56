"""Fused ONNX graphs: the forget-vector prefix grafted in front of a frozen classifier.

The prefix is pure ONNX built with ``onnx.helper`` (no hand-edited protobuf)::

    coeffs [N, K] ─(Clip, optional)─ MatMul(·, forget_bank [K, C·H·W]) ─ Reshape [N, C, H, W] ─┐
    image  [N, C, H, W] ──────────────────────────────────────────────────────────── Add ─┐
                                             (Add mandatory δ) ─► classifier ─► logits ◄─┘

``onnx.compose.merge_models`` joins it to the classifier, whose node and tensor names, opset and
metadata stay as they were. Every input is validated before any graph is built.

Status: library building block of the export milestone (issue 3); the bundle format, the CLI,
parity reports, TensorRT and Triton come on top of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from forgetrt.runtime.errors import CorruptArtifactError, InvalidInputError, MismatchError
from forgetrt.runtime.guards import GUARD_LOGIT
from forgetrt.runtime.iospec import IOSpec

__all__ = ["MIN_OPSET", "GUARD_LOGIT", "forget_prefix", "fuse_classifier", "classifier_io", "freeze_bank"]

MIN_OPSET = 13  # Clip with tensor bounds (11) and Reshape with allowzero-free semantics; 13 keeps both simple
_PREFIX_NAMES = (
    "forget_bank",
    "forget_delta_flat",
    "forget_delta_shape",
    "forget_delta",
    "forget_perturbed",
    "forget_coeffs_clipped",
    "forget_coeff_lo",
    "forget_coeff_hi",
    "forget_mandatory",
    "forget_input",
    "forget_unguarded_logits",
    "forget_guard_mask",
)


def classifier_io(model: onnx.ModelProto) -> tuple[str, str]:
    """The single real input and single output of a classifier graph (initializers are not inputs)."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    outputs = [o.name for o in model.graph.output]
    if len(inputs) != 1 or len(outputs) != 1:
        raise CorruptArtifactError(
            f"expected a classifier with one input and one output, got inputs {inputs} and outputs {outputs}"
        )
    return inputs[0], outputs[0]


def _opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    raise CorruptArtifactError("classifier has no default-domain opset import")


def forget_prefix(
    iospec: IOSpec,
    bank: np.ndarray,
    *,
    mandatory: np.ndarray | None = None,
    coeff_range: tuple[float, float] | None = None,
    opset: int = 17,
    ir_version: int | None = None,
    output_name: str = "forget_input",
    overridable_bank: bool = True,
) -> onnx.ModelProto:
    """The prefix graph ``(image [N,C,H,W], coeffs [N,K]) -> output_name [N,C,H,W]``.

    With ``overridable_bank`` (the default) ``forget_bank`` is also declared as an optional graph
    input with a symbolic K: the initializer serves plain ONNX runtimes (Triton, ``onnxruntime``), and
    ForgetRT's runtime feeds a newer bank (hot swap, even with a different K) without a rebuild.
    """
    if opset < MIN_OPSET:
        raise InvalidInputError(
            f"opset {opset} is too old for the forget prefix (MatMul/Reshape/Clip): use >= {MIN_OPSET}"
        )
    bank = np.asarray(bank)
    if bank.ndim != 2 or bank.shape[1] != iospec.numel or bank.shape[0] < 1:
        raise InvalidInputError(f"bank must be [K >= 1, {iospec.numel}], got {bank.shape}")
    if not np.all(np.isfinite(bank)):
        raise InvalidInputError("bank contains NaN or Inf")
    if mandatory is not None:
        mandatory = np.asarray(mandatory, np.float32)
        if mandatory.shape != tuple(iospec.shape) or not np.all(np.isfinite(mandatory)):
            raise InvalidInputError(f"mandatory δ must be finite float32 {tuple(iospec.shape)}, got {mandatory.shape}")
    if coeff_range is not None:
        lo, hi = (float(v) for v in coeff_range)
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise InvalidInputError(f"coefficient range must be finite LO < HI, got {coeff_range}")
    k = bank.shape[0]
    c, h, w = iospec.shape
    f32 = TensorProto.FLOAT
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(bank, np.float32), "forget_bank"),
        numpy_helper.from_array(np.array([-1, c, h, w], np.int64), "forget_delta_shape"),
    ]
    nodes = []
    coeffs = iospec.coeffs_name
    if coeff_range is not None:
        inits += [
            numpy_helper.from_array(np.array(lo, np.float32), "forget_coeff_lo"),
            numpy_helper.from_array(np.array(hi, np.float32), "forget_coeff_hi"),
        ]
        nodes.append(
            helper.make_node(
                "Clip", [coeffs, "forget_coeff_lo", "forget_coeff_hi"], ["forget_coeffs_clipped"], name="forget_clip"
            )
        )
        coeffs = "forget_coeffs_clipped"
    nodes += [
        helper.make_node("MatMul", [coeffs, "forget_bank"], ["forget_delta_flat"], name="forget_matmul"),
        helper.make_node(
            "Reshape", ["forget_delta_flat", "forget_delta_shape"], ["forget_delta"], name="forget_reshape"
        ),
    ]
    last = "forget_perturbed" if mandatory is not None else output_name
    nodes.append(helper.make_node("Add", [iospec.image_name, "forget_delta"], [last], name="forget_input_add"))
    if mandatory is not None:
        inits.append(numpy_helper.from_array(mandatory[None], "forget_mandatory"))
        nodes.append(helper.make_node("Add", [last, "forget_mandatory"], [output_name], name="forget_mandatory_add"))
    kdim: int | str = "K" if overridable_bank else k
    inputs = [
        helper.make_tensor_value_info(iospec.image_name, f32, ["N", c, h, w]),
        helper.make_tensor_value_info(iospec.coeffs_name, f32, ["N", kdim]),
    ]
    if overridable_bank:
        inputs.append(helper.make_tensor_value_info("forget_bank", f32, [kdim, c * h * w]))
    graph = helper.make_graph(
        nodes,
        "forgetrt_prefix",
        inputs,
        [helper.make_tensor_value_info(output_name, f32, ["N", c, h, w])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="forgetrt")
    if ir_version is not None:
        model.ir_version = ir_version
    return model


def fuse_classifier(
    classifier: onnx.ModelProto,
    iospec: IOSpec,
    bank: np.ndarray,
    *,
    vector_names: Sequence[str],
    mandatory: np.ndarray | None = None,
    coeff_range: tuple[float, float] | None = None,
    metadata: Mapping[str, str] | None = None,
    overridable_bank: bool = True,
    guard_classes: Sequence[int] = (),
) -> onnx.ModelProto:
    """Graft the forget prefix onto ``classifier`` (its node, tensor and output names are kept) and
    record the vector order in ``metadata_props``. Checked with ``onnx.checker.check_model(full_check=True)``.

    ``overridable_bank=False`` keeps ``forget_bank`` a plain constant (no graph input a caller could feed:
    required when mandatory vectors are baked in). ``guard_classes``: logits of these classes get
    :data:`GUARD_LOGIT` added at the end of the graph, so no input can make the model predict them.
    """
    if len(vector_names) != np.asarray(bank).shape[0]:
        raise InvalidInputError(f"{len(vector_names)} vector names for a bank of {np.asarray(bank).shape[0]} rows")
    clf_in, clf_out = classifier_io(classifier)
    taken = {n for node in classifier.graph.node for n in (*node.input, *node.output)} | {
        i.name for i in classifier.graph.initializer
    }
    clash = sorted(taken & {*_PREFIX_NAMES, iospec.image_name, iospec.coeffs_name} - {clf_in})
    if clash:
        raise InvalidInputError(f"classifier already uses names reserved for the forget prefix: {clash}")
    in_shape = [
        d.dim_value if d.HasField("dim_value") else None
        for d in classifier.graph.input[
            [i.name for i in classifier.graph.input].index(clf_in)
        ].type.tensor_type.shape.dim
    ]
    if len(in_shape) != 4 or tuple(in_shape[1:]) != tuple(iospec.shape):
        raise MismatchError(
            f"classifier input {clf_in!r} has shape {in_shape}, the bank's IOSpec says [N, "
            f"{', '.join(map(str, iospec.shape))}]"
        )
    opset = _opset(classifier)
    prefix = forget_prefix(
        iospec,
        bank,
        mandatory=mandatory,
        coeff_range=coeff_range,
        opset=opset,
        ir_version=classifier.ir_version,
        overridable_bank=overridable_bank,
    )
    if clf_in == iospec.image_name:
        # the classifier's own input carries the name the fused model exposes: rename it inside the classifier
        classifier = onnx.compose.add_prefix(
            classifier,
            "clf_",
            rename_nodes=False,
            rename_edges=False,
            rename_inputs=True,
            rename_outputs=False,
            rename_initializers=False,
            rename_value_infos=False,
            rename_functions=False,
        )
        clf_in = "clf_" + clf_in
    fused = onnx.compose.merge_models(
        prefix,
        classifier,
        io_map=[("forget_input", clf_in)],
        producer_name="forgetrt",
        doc_string="frozen classifier with a fused forget-vector input-add prefix",
    )
    if guard_classes:
        fused = _add_output_guard(fused, iospec, guard_classes)
    props = {"forgetrt.vectors": ",".join(vector_names), **(metadata or {})}
    existing = {p.key for p in fused.metadata_props}
    for key, value in props.items():
        if key not in existing:
            fused.metadata_props.append(onnx.StringStringEntryProto(key=key, value=str(value)))
    onnx.checker.check_model(fused, full_check=True)
    return fused


def _add_output_guard(model: onnx.ModelProto, iospec: IOSpec, classes: Sequence[int]) -> onnx.ModelProto:
    bad = [c for c in classes if not 0 <= int(c) < iospec.num_classes]
    if bad:
        raise InvalidInputError(f"guard classes {bad} are not classes of this model (0..{iospec.num_classes - 1})")
    out_name = model.graph.output[0].name
    inner = "forget_unguarded_logits"
    for node in model.graph.node:
        node.output[:] = [inner if o == out_name else o for o in node.output]
        node.input[:] = [inner if i == out_name else i for i in node.input]
    mask = np.zeros(iospec.num_classes, np.float32)
    mask[list(classes)] = GUARD_LOGIT
    model.graph.initializer.append(numpy_helper.from_array(mask, "forget_guard_mask"))
    model.graph.node.append(helper.make_node("Add", [inner, "forget_guard_mask"], [out_name], name="forget_guard_add"))
    return model


def freeze_bank(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a fused model whose ``forget_bank`` is a plain constant again and whose K is concrete
    (for engines such as TensorRT that treat graph inputs as runtime tensors)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    bank = next((i for i in out.graph.initializer if i.name == "forget_bank"), None)
    if bank is None:
        raise CorruptArtifactError("model has no forget_bank initializer")
    k = bank.dims[0]
    keep = [i for i in out.graph.input if i.name != "forget_bank"]
    del out.graph.input[:]
    out.graph.input.extend(keep)
    for i in out.graph.input:
        dims = i.type.tensor_type.shape.dim
        if len(dims) == 2 and dims[1].dim_param == "K":
            dims[1].ClearField("dim_param")
            dims[1].dim_value = k
    return out
