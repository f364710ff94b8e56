import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from forgetrt.export.onnx_export import export_onnx
from forgetrt.runtime.bundle import Bundle
from forgetrt.runtime.errors import ArtifactError, CorruptArtifactError, InvalidInputError, MismatchError, UnknownNameError
from forgetrt.tools.cli import cli


@pytest.fixture(scope="module")
def bundle(digits_model_dir, digits_bank, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "digits"
    res = export_onnx(digits_model_dir, digits_bank[0], out, mandatory={"forget-9": 1.0}, coeff_range=(-2.0, 2.0))
    return out, res


def test_bundle_contents_and_parity(bundle, digits_bank):
    out, res = bundle
    b = Bundle.load(out)
    assert b.vectors == tuple(f"forget-{c}" for c in range(9)) and b.mandatory == {"forget-9": 1.0}
    assert b.coeff_range == (-2.0, 2.0) and res["parity"]["rel_to_scale"] <= 1e-4
    assert sorted(p.name for p in out.iterdir()) == ["bundle.json", "model.onnx"]
    sess = ort.InferenceSession(str(b.onnx_path), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["forgetrt.vectors"] == ",".join(b.vectors) and meta["forgetrt.bundle_id"] == b.bundle_id
    assert [i.name for i in sess.get_inputs()] == ["image", "coeffs"] and sess.get_inputs()[1].shape[1] == 9
    # batch dimension is dynamic
    for n in (1, 7):
        out_ = sess.run(None, {"image": np.zeros((n, 1, 8, 8), np.float32), "coeffs": np.zeros((n, 9), np.float32)})[0]
        assert out_.shape == (n, 10)


def test_tampered_bundle_is_refused(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle[0], copy)
    raw = bytearray((copy / "model.onnx").read_bytes())
    raw[-10] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(raw))
    with pytest.raises(CorruptArtifactError, match="was modified"):
        Bundle.load(copy)
    (copy / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        Bundle.load(copy)


def test_export_errors(digits_model_dir, digits_bank, tmp_path):
    bank = digits_bank[0]
    with pytest.raises(InvalidInputError, match="both mandatory and selectable"):
        export_onnx(digits_model_dir, bank, tmp_path / "x", vectors=["forget-1"], mandatory={"forget-1": 1.0})
    with pytest.raises(UnknownNameError, match="unknown vector 'nope'"):
        export_onnx(digits_model_dir, bank, tmp_path / "x", vectors=["nope"])
    with pytest.raises(InvalidInputError, match="opset 11 is too old"):
        export_onnx(digits_model_dir, bank, tmp_path / "x", opset=11)
    assert not (tmp_path / "x").exists()


def test_export_cli_and_other_model(digits_model_dir, digits_bank, tmp_path):
    r = CliRunner().invoke(cli, ["export", "onnx", "--model", str(digits_model_dir), "--bank", str(digits_bank[0]), "--out", str(tmp_path / "b"), "--vectors", "forget-0,forget-3"])
    assert r.exit_code == 0, r.output
    assert "parity onnxruntime vs torch" in r.output
    assert json.loads((tmp_path / "b" / "bundle.json").read_text())["vectors"] == ["forget-0", "forget-3"]
    r = CliRunner().invoke(cli, ["export", "onnx", "--model", str(digits_model_dir), "--bank", str(digits_bank[0]), "--out", str(tmp_path / "b")])
    assert r.exit_code == 3 and "already exists" in r.output
    r = CliRunner().invoke(cli, ["train-model", "--arch", "digits-cnn", "--epochs", "1", "--seed", "5", "--out", str(tmp_path / "m2"), "--device", "cpu"])
    assert r.exit_code == 0
    with pytest.raises(MismatchError, match="fingerprint"):
        export_onnx(tmp_path / "m2", digits_bank[0], tmp_path / "c")
