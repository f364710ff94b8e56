import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from forgetrt.export.onnx_export import export_classifier, export_onnx
from forgetrt.export.parity import run_parity
from forgetrt.runtime.bundle import Bundle
from forgetrt.runtime.errors import (
    ArtifactError,
    BackendUnavailableError,
    CorruptArtifactError,
    InvalidInputError,
    MismatchError,
    UnknownNameError,
)
from forgetrt.tools.cli import cli


def cli_run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def bundle(digits_model_dir, digits_bank, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "digits"
    res = export_onnx(
        digits_bank[0],
        out,
        model_dir=digits_model_dir,
        mandatory={"forget-9": 1.0},
        coeff_range=(-2.0, 2.0),
        policies={"eu": {"forget-3": 1.0}, "both": {"forget-0": 1.0, "forget-3": 1.0}},
    )
    return out, res


def test_bundle_contents_and_parity(bundle):
    out, res = bundle
    b = Bundle.load(out)
    assert b.vectors == tuple(f"forget-{c}" for c in range(9)) and b.mandatory == {"forget-9": 1.0}
    assert b.coeff_range == (-2.0, 2.0) and res["parity"]["rel_to_scale"] <= 1e-4 and b.has_torch_classifier
    assert b.manifest.policies["eu"] == {"forget-3": 1.0}
    assert sorted(p.name for p in out.iterdir()) == [
        "bundle.json",
        "classifier.json",
        "classifier.safetensors",
        "model.onnx",
        "vectors.safetensors",
    ]
    sess = ort.InferenceSession(str(b.onnx_path), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["forgetrt.vectors"] == ",".join(b.vectors) and meta["forgetrt.bundle_id"] == b.bundle_id
    # with a mandatory vector baked in, the shipped graph lets nobody feed another bank (K is fixed)
    assert [i.name for i in sess.get_inputs()] == ["image", "coeffs"] and sess.get_inputs()[1].shape[1] == 9
    assert [i.name for i in sess.get_overridable_initializers()] == []
    import onnx

    init = next(i for i in onnx.load(str(b.onnx_path)).graph.initializer if i.name == "forget_bank")
    assert list(init.dims) == [9, 64]
    for n in (1, 7):  # dynamic batch
        y = sess.run(None, {"image": np.zeros((n, 1, 8, 8), np.float32), "coeffs": np.zeros((n, 9), np.float32)})[0]
        assert y.shape == (n, 10)
    stacked, mand = b.vector_arrays()
    assert stacked.shape == (9, 64) and mand.shape == (1, 8, 8)


def test_parity_report(bundle):
    rep = run_parity(bundle[0], device="cpu")
    assert rep["ok"] and rep["reference"] == "torch-cpu-fp32" and rep["device"] == "cpu"
    ort_res = rep["backends"]["onnxruntime"]
    assert (
        ort_res["status"] == "ok"
        and ort_res["synthetic"]["rel_to_scale"] <= 1e-4
        and ort_res["synthetic"]["numerics"] == "fp32"
    )
    assert ort_res["synthetic"]["top1_agreement"] == 1.0
    torch_res = rep["backends"]["torch"]
    # the serving path: the torch backend as `serve` builds it (BN and Normalize folded on CPU)
    assert (
        torch_res["status"] == "ok"
        and torch_res["described"]["fuse"] == "bn"
        and torch_res["described"]["fused"]["bn_folded"] > 0
    )
    assert rep["backends"]["tensorrt"]["status"] == "skipped" and rep["backends"]["tensorrt"]["reason"]
    r = cli_run("parity", bundle[0], "--backends", "onnxruntime", "--device", "cpu")
    assert r.exit_code == 0 and "onnxruntime  synthetic ok" in r.output, r.output
    with pytest.raises(UnknownNameError, match="unknown backend 'tvm'"):
        run_parity(bundle[0], ["tvm"])


def test_parity_uses_the_serving_options_and_real_images(bundle, digits):
    images, labels = digits.test_images(200)
    rep = run_parity(
        bundle[0],
        ["torch", "onnxruntime"],
        device="cpu",
        options={"torch": {"precision": "bf16", "fuse": "none"}},
        images=images,
        labels=labels,
    )
    t = rep["backends"]["torch"]
    assert t["options"]["precision"] == "bf16" and t["described"]["fuse"] == "none"
    assert (
        t["synthetic"]["numerics"] == "bf16" and t["synthetic"]["tolerance"] > 1e-3
    )  # judged by the bf16 row of the one table
    assert rep["rows"]["data"] == 200 and t["data"]["top1_agreement"] > 0.95 and rep["ok"]
    assert abs(rep["backends"]["onnxruntime"]["data"]["accuracy"] - rep["reference_accuracy"]) < 1e-9
    r = cli_run(
        "parity",
        bundle[0],
        "--backends",
        "torch",
        "--device",
        "cpu",
        "--fuse",
        "bn",
        "--data",
        "digits",
        "--limit",
        "50",
    )
    assert r.exit_code == 0 and "torch        data" in r.output and "top-1 agreement" in r.output, r.output
    r = cli_run("parity", bundle[0], "--backends", "onnxruntime", "--device", "cpu", "--precision", "bf16")
    assert r.exit_code == 2 and "--precision is an option of torch" in r.output


def test_parity_catches_a_serving_path_that_drifts(bundle, monkeypatch):
    """A backend whose served logits drift (a stand-in for a broken fused kernel) fails parity."""
    import dataclasses

    from forgetrt.runtime import backends as reg
    from forgetrt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    class Drifting(OnnxRuntimeBackend):
        name = "drifting"

        def _infer(self, images, coeffs, bank):
            out = super()._infer(images, coeffs, bank)
            return out + 1e-2 * np.abs(out).max()

    entry = dataclasses.replace(reg.get_backend("onnxruntime"), name="drifting", factory=Drifting, rank={})
    monkeypatch.setitem(reg._REGISTRY, "drifting", entry)
    rep = run_parity(bundle[0], ["drifting"], device="cpu")
    assert not rep["ok"] and rep["backends"]["drifting"]["status"] == "mismatch"


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_requested_without_tensorrt(bundle):
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        run_parity(bundle[0], ["tensorrt"])
    r = cli_run("export", "trt", "--bundle", bundle[0])
    assert r.exit_code == 4 and "NVIDIA" in r.output and "Traceback" not in r.output


def test_bank_is_overridable_and_freezable(digits_model_dir, digits_bank, tmp_path):
    """Feeding forget_bank overrides the baked bank (hot swap, even with another K); freeze_bank undoes it.
    (A bundle without mandatory vectors: with them the bank is never overridable.)"""
    import onnx

    from forgetrt.export.onnx_graph import freeze_bank

    export_onnx(
        digits_bank[0], tmp_path / "plain", model_dir=digits_model_dir, vectors=[f"forget-{c}" for c in range(9)]
    )
    b = Bundle.load(tmp_path / "plain")
    sess = ort.InferenceSession(str(b.onnx_path), providers=["CPUExecutionProvider"])
    stacked, _ = b.vector_arrays()
    x = np.random.default_rng(1).random((3, 1, 8, 8), dtype=np.float32)
    c9 = np.eye(9, dtype=np.float32)[[0, 3, 5]]
    base = sess.run(None, {"image": x, "coeffs": c9})[0]
    same = sess.run(None, {"image": x, "coeffs": c9, "forget_bank": stacked})[0]
    np.testing.assert_allclose(base, same, rtol=1e-6, atol=1e-6)
    # a bank of K=2 whose rows are vectors 3 and 0: the same logits for the matching rows
    c2 = np.array([[0, 1], [1, 0]], np.float32)
    two = sess.run(None, {"image": x[:2], "coeffs": c2, "forget_bank": stacked[[3, 0]]})[0]
    np.testing.assert_allclose(two, base[:2], rtol=1e-5, atol=1e-5)
    frozen = freeze_bank(onnx.load(str(b.onnx_path)))
    onnx.checker.check_model(frozen, full_check=True)
    fs = ort.InferenceSession(frozen.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in fs.get_overridable_initializers()] == [] and fs.get_inputs()[1].shape[1] == 9
    np.testing.assert_allclose(fs.run(None, {"image": x, "coeffs": c9})[0], base, rtol=1e-5, atol=1e-5)


def test_tampered_bundle_is_refused(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle[0], copy)
    raw = bytearray((copy / "model.onnx").read_bytes())
    raw[-10] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(raw))
    with pytest.raises(CorruptArtifactError, match="was modified"):
        Bundle.load(copy)
    r = cli_run("parity", copy)
    assert r.exit_code == 3 and "was modified" in r.output
    (copy / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        Bundle.load(copy)


def test_export_errors(digits_model_dir, digits_bank, tmp_path):
    bank = digits_bank[0]
    with pytest.raises(InvalidInputError, match="both mandatory and selectable"):
        export_onnx(bank, tmp_path / "x", model_dir=digits_model_dir, vectors=["forget-1"], mandatory={"forget-1": 1.0})
    with pytest.raises(UnknownNameError, match="unknown vector 'nope'"):
        export_onnx(bank, tmp_path / "x", model_dir=digits_model_dir, vectors=["nope"])
    with pytest.raises(InvalidInputError, match="opset must be between 13 and 20, got 11"):
        export_onnx(bank, tmp_path / "x", model_dir=digits_model_dir, opset=11)
    with pytest.raises(UnknownNameError, match="policy 'p'"):
        export_onnx(
            bank, tmp_path / "x", model_dir=digits_model_dir, vectors=["forget-0"], policies={"p": {"forget-1": 1.0}}
        )
    with pytest.raises(InvalidInputError, match="exactly one of --model"):
        export_onnx(bank, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_graft_onto_onnx_classifier(digits_model_dir, digits_bank, tmp_path):
    bank = tmp_path / "bank"
    shutil.copytree(digits_bank[0], bank)
    clf = tmp_path / "clf.onnx"
    # not yet recorded in the bank: refused unless explicitly allowed
    export_classifier(digits_model_dir, clf)
    with pytest.raises(MismatchError, match="allow-unverified-model"):
        export_onnx(bank, tmp_path / "g", from_onnx=clf)
    res = export_onnx(
        bank, tmp_path / "g", from_onnx=clf, allow_unverified_model=True, vectors=["forget-0", "forget-3"]
    )
    assert res["model_verified"] is False and res["source"] == "onnx"
    r = cli_run("export", "classifier", "--model", digits_model_dir, "--out", clf, "--bank", bank)
    assert r.exit_code == 0, r.output
    res = export_onnx(bank, tmp_path / "g2", from_onnx=clf, vectors=["forget-0", "forget-3"])
    assert res["model_verified"] is True and res["parity"]["rel_to_scale"] <= 1e-4
    rep = run_parity(tmp_path / "g2")
    assert rep["reference"].startswith("onnxruntime") and rep["backends"]["onnxruntime"]["status"] == "ok"
    assert rep["backends"]["torch"]["status"] == "skipped"
    # the grafted and the model-exported bundles compute the same logits
    x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    c = np.eye(2, dtype=np.float32)[[0, 1, 0, 1]]
    a = ort.InferenceSession(str(tmp_path / "g2" / "model.onnx")).run(None, {"image": x, "coeffs": c})[0]
    export_onnx(bank, tmp_path / "m", model_dir=digits_model_dir, vectors=["forget-0", "forget-3"])
    b = ort.InferenceSession(str(tmp_path / "m" / "model.onnx")).run(None, {"image": x, "coeffs": c})[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x01garbage")
    with pytest.raises(CorruptArtifactError, match="not a valid ONNX model"):
        export_onnx(bank, tmp_path / "j", from_onnx=tmp_path / "junk.onnx", allow_unverified_model=True)


def test_export_cli_and_other_model(digits_model_dir, digits_bank, tmp_path):
    r = cli_run(
        "export",
        "onnx",
        "--model",
        digits_model_dir,
        "--bank",
        digits_bank[0],
        "--out",
        tmp_path / "b",
        "--vectors",
        "forget-0,forget-3",
        "--coeff-range",
        "-1,1",
    )
    assert r.exit_code == 0, r.output
    assert "parity onnxruntime vs reference" in r.output
    assert json.loads((tmp_path / "b" / "bundle.json").read_text())["vectors"] == ["forget-0", "forget-3"]
    r = cli_run("export", "onnx", "--model", digits_model_dir, "--bank", digits_bank[0], "--out", tmp_path / "b")
    assert r.exit_code == 3 and "already exists" in r.output
    r = cli_run(
        "export",
        "onnx",
        "--model",
        digits_model_dir,
        "--bank",
        digits_bank[0],
        "--out",
        tmp_path / "c",
        "--coeff-range",
        "1",
    )
    assert r.exit_code == 2 and "LO,HI" in r.output
    r = cli_run(
        "train-model",
        "--arch",
        "digits-cnn",
        "--epochs",
        "1",
        "--seed",
        "5",
        "--out",
        tmp_path / "m2",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0
    r = cli_run("export", "onnx", "--model", tmp_path / "m2", "--bank", digits_bank[0], "--out", tmp_path / "c")
    assert r.exit_code == 3 and "fingerprint" in r.output and not (tmp_path / "c").exists()


def test_triton_repository(bundle, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    r = cli_run(
        "export",
        "triton",
        "--bundle",
        bundle[0],
        "--repo",
        tmp_path / "repo",
        "--name",
        "digits",
        "--max-batch",
        "32",
        "--max-queue-delay-us",
        "250",
        "--instances",
        "2",
        "--accept-clipping",
    )
    assert r.exit_code == 0, r.output
    d = tmp_path / "repo" / "digits"
    cfg = text_format.Parse((d / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.name == "digits" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 32
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("image", [1, 8, 8]), ("coeffs", [9])]
    assert cfg.input[0].data_type == model_config_pb2.TYPE_FP32
    assert (
        cfg.output[0].name == "logits"
        and list(cfg.output[0].dims) == [10]
        and cfg.output[0].label_filename == "labels.txt"
    )
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 250
    assert cfg.instance_group[0].count == 2
    assert cfg.parameters["forgetrt_vectors"].string_value.split(",")[0] == "forget-0"
    assert (d / "1" / "model.onnx").read_bytes() == (bundle[0] / "model.onnx").read_bytes()
    assert (d / "labels.txt").read_text().split() == [str(i) for i in range(10)]
    r = cli_run("export", "triton", "--bundle", bundle[0], "--repo", tmp_path / "repo", "--name", "digits")
    assert r.exit_code == 2 and "clips coefficients" in r.output and "--accept-clipping" in r.output
    r = cli_run(
        "export", "triton", "--bundle", bundle[0], "--repo", tmp_path / "repo", "--name", "digits", "--accept-clipping"
    )
    assert r.exit_code == 3 and "already exists" in r.output
    r = cli_run(
        "export", "triton", "--bundle", bundle[0], "--repo", tmp_path / "repo", "--backend", "trt", "--accept-clipping"
    )
    assert r.exit_code == 3 and "model.plan" in r.output
    r = cli_run(
        "export",
        "triton",
        "--bundle",
        bundle[0],
        "--repo",
        tmp_path / "repo",
        "--name",
        "bad name",
        "--accept-clipping",
    )
    assert r.exit_code == 2 and "invalid Triton model name" in r.output


@pytest.mark.trt
@pytest.mark.gpu
def test_tensorrt_engine_parity(bundle, tmp_path):
    from forgetrt.export.tensorrt import TrtBuildConfig, build_engine

    copy = tmp_path / "b"
    shutil.copytree(bundle[0], copy)
    build_engine(copy, TrtBuildConfig(max_batch_size=64, opt_batch_size=16))
    rep = run_parity(copy, ["tensorrt"])
    assert rep["backends"]["tensorrt"]["status"] == "ok"


def test_policies_file(digits_model_dir, digits_bank, tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"eu": {"forget-3": 1.0}}))
    bad.write_text(json.dumps({"eu": ["forget-3"]}))
    args = ["export", "onnx", "--model", digits_model_dir, "--bank", digits_bank[0], "--policies"]
    r = cli_run(*args, bad, "--out", tmp_path / "b1")
    assert r.exit_code == 2 and "must hold {policy: {vector: weight}}" in r.output and not (tmp_path / "b1").exists()
    r = cli_run(*args, good, "--out", tmp_path / "b2")
    assert r.exit_code == 0, r.output
    assert Bundle.load(tmp_path / "b2").manifest.policies == {"eu": {"forget-3": 1.0}}


def test_parity_on_real_images_clips_rows_into_the_coefficient_range(digits_model_dir, digits_bank, digits, tmp_path):
    export_onnx(digits_bank[0], tmp_path / "b", model_dir=digits_model_dir, coeff_range=(0.0, 0.5))
    images, labels = digits.test_images(30)
    rep = run_parity(tmp_path / "b", ["onnxruntime"], device="cpu", images=images, labels=labels)
    assert rep["ok"] and rep["rows"]["data"] == 30
