"""The fused graph against a NumPy/PyTorch reference on onnxruntime (CPU)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, parser

from forgetrt.export.onnx_graph import forget_prefix, fuse_classifier
from forgetrt.export.torch_onnx import classifier_to_onnx
from forgetrt.runtime import IOSpec
from forgetrt.runtime.architectures import create_model
from forgetrt.runtime.errors import CorruptArtifactError, InvalidInputError, MismatchError

SPEC = IOSpec(shape=(1, 8, 8), mean=(0.3,), std=(0.4,), labels=tuple("0123456789"))


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def torch_model():
    torch.manual_seed(0)
    return create_model("digits-cnn", SPEC).eval()


def test_fused_digits_graph_matches_torch(torch_model):
    rng = np.random.default_rng(0)
    bank = rng.normal(0, 0.1, (3, 64)).astype(np.float32)
    mandatory = rng.normal(0, 0.05, (1, 8, 8)).astype(np.float32)
    fused = fuse_classifier(
        classifier_to_onnx(torch_model, SPEC),
        SPEC,
        bank,
        vector_names=["a", "b", "c"],
        mandatory=mandatory,
        metadata={"forgetrt.bundle_id": "t"},
    )
    ops = [n.op_type for n in fused.graph.node]
    assert ops[:4] == ["MatMul", "Reshape", "Add", "Add"]
    assert [i.name for i in fused.graph.input] == ["image", "coeffs", "forget_bank"] and fused.graph.output[
        0
    ].name == "logits"
    meta = {p.key: p.value for p in fused.metadata_props}
    assert meta["forgetrt.vectors"] == "a,b,c" and meta["forgetrt.bundle_id"] == "t"
    x = rng.random((5, 1, 8, 8), dtype=np.float32)
    coeffs = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0.5, -1, 2], [1, 1, 1]], np.float32)  # rows all differ
    got = _session(fused).run(None, {"image": x, "coeffs": coeffs})[0]
    delta = (coeffs @ bank).reshape(5, 1, 8, 8) + mandatory
    with torch.no_grad():
        want = torch_model(torch.from_numpy(x + delta)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_graft_keeps_names_and_clips(tmp_path):
    # a user's classifier, written in ONNX text syntax, whose input is already called "image"
    clf = parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        agraph (float[N, 1, 2, 2] image) => (float[N, 4] scores) {
            flat = Flatten<axis = 1>(image)
            scores = Mul(flat, two)
        }
        """
    )
    clf.graph.initializer.append(onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two"))
    spec = IOSpec(shape=(1, 2, 2), mean=(0.0,), std=(1.0,), labels=("a", "b", "c", "d"))
    bank = np.eye(2, 4, dtype=np.float32)
    fused = fuse_classifier(clf, spec, bank, vector_names=["u", "v"], coeff_range=(0.0, 1.0))
    assert fused.graph.output[0].name == "scores"
    assert "Clip" in [n.op_type for n in fused.graph.node]
    x = np.zeros((1, 1, 2, 2), np.float32)
    out = _session(fused).run(None, {"image": x, "coeffs": np.array([[5.0, -3.0]], np.float32)})[0]
    np.testing.assert_allclose(out, [[2.0, 0.0, 0.0, 0.0]])  # coefficients clipped to [0, 1]


def test_fuse_errors(torch_model):
    clf = classifier_to_onnx(torch_model, SPEC)
    bank = np.zeros((2, 64), np.float32)
    with pytest.raises(InvalidInputError, match="opset 11 is too old"):
        forget_prefix(SPEC, bank, opset=11)
    with pytest.raises(InvalidInputError, match="bank must be"):
        forget_prefix(SPEC, np.zeros((2, 63), np.float32))
    with pytest.raises(InvalidInputError, match="NaN"):
        forget_prefix(SPEC, np.full((2, 64), np.nan, np.float32))
    with pytest.raises(InvalidInputError, match="names"):
        fuse_classifier(clf, SPEC, bank, vector_names=["a"])
    with pytest.raises(InvalidInputError, match="coefficient range"):
        forget_prefix(SPEC, bank, coeff_range=(1.0, 0.0))
    other = IOSpec(shape=(1, 4, 4), mean=(0.0,), std=(1.0,), labels=tuple("0123456789"))
    with pytest.raises(MismatchError, match="shape"):
        fuse_classifier(clf, other, np.zeros((2, 16), np.float32), vector_names=["a", "b"])
    two_out = helper.make_model(
        helper.make_graph(
            [],
            "g",
            [helper.make_tensor_value_info("x", 1, [1])],
            [helper.make_tensor_value_info("x", 1, [1]), helper.make_tensor_value_info("y", 1, [1])],
        )
    )
    with pytest.raises(CorruptArtifactError, match="one input and one output"):
        fuse_classifier(two_out, SPEC, bank, vector_names=["a", "b"])
