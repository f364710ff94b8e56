"""Export a frozen PyTorch classifier to ONNX (torch imported here only)."""

from __future__ import annotations

import io
import warnings

import onnx

from forgetrt.runtime.errors import InvalidInputError
from forgetrt.runtime.iospec import IOSpec

__all__ = ["classifier_to_onnx", "check_opset", "CLASSIFIER_INPUT"]

#: the newest opset torch's TorchScript exporter writes
MAX_EXPORT_OPSET = 20


def check_opset(opset: int) -> int:
    """An opset the prefix and the exporter both support, else a typed error naming the range."""
    from .onnx_graph import MIN_OPSET

    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_EXPORT_OPSET:
        raise InvalidInputError(f"opset must be between {MIN_OPSET} and {MAX_EXPORT_OPSET}, got {opset!r}")
    return opset


CLASSIFIER_INPUT = "classifier_input"


def classifier_to_onnx(model, iospec: IOSpec, opset: int = 17) -> onnx.ModelProto:
    """The classifier alone: ``classifier_input [N, C, H, W] -> logits [N, classes]``, dynamic batch.

    Uses the TorchScript-based exporter, which needs no extra packages (the dynamo exporter needs
    onnxscript); the result is plain ONNX either way.
    """
    check_opset(opset)
    import torch

    model = model.eval().to("cpu", memory_format=torch.contiguous_format)
    example = torch.zeros(2, *iospec.shape)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            buf,
            input_names=[CLASSIFIER_INPUT],
            output_names=[iospec.output_name],
            dynamic_axes={CLASSIFIER_INPUT: {0: "N"}, iospec.output_name: {0: "N"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return onnx.load_from_string(buf.getvalue())
