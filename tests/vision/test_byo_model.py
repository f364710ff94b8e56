"""Bring your own classifier: torchvision and timm architectures on a generated 64x64 ImageFolder, through
train-model / import-model, train-vector, compose, eval, export (fused and grafted), parity and serving.

torchvision must match the installed torch build exactly: PyPI's torchvision does not load beside the CPU
torch wheel the main CI environment uses, so these run in the vision environment `.ci/run` builds
(torch 2.14.1 + torchvision 0.29.1), driven from tests/test_install_profiles.py."""

import json

import numpy as np
import pytest

torchvision = pytest.importorskip("torchvision", reason="torchvision is not importable beside this torch build")
timm = pytest.importorskip("timm", reason="timm is not installed")

import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from imagefolder_data import CLASSES, make_imagefolder  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from forgetrt.runtime.errors import InvalidInputError, UnknownNameError  # noqa: E402
from forgetrt.runtime.model_folder import load_model, read_model_manifest  # noqa: E402
from forgetrt.tools.cli import cli  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import os

    root = tmp_path_factory.mktemp("byo")
    os.environ["FORGETRT_CACHE_DIR"] = str(root / "cache")
    return f"imagefolder:{make_imagefolder(root / 'images', n_train=30, n_test=10)}"


def _run(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def test_torchvision_model_end_to_end(tmp_path, data):
    m = tmp_path / "model"
    out = _run(
        "train-model",
        "--arch",
        "torchvision:shufflenet_v2_x0_5",
        "--data",
        data,
        "--image-size",
        64,
        "--epochs",
        20,
        "--batch-size",
        8,
        "--lr",
        0.05,
        "--val-fraction",
        0.2,
        "--out",
        m,
        "--device",
        "cpu",
    )
    info = read_model_manifest(m)
    assert info.arch == "torchvision:shufflenet_v2_x0_5" and info.iospec.shape == (3, 64, 64)
    assert info.iospec.labels == CLASSES and info.validation["count"] == 18, out
    assert info.metrics["test_acc"] > 60, info.metrics  # the classes are easy: the model learned them
    bank = tmp_path / "bank"
    _run(
        "train-vector",
        "--model",
        m,
        "--data",
        data,
        "--bank",
        bank,
        "--each-class",
        "--epochs",
        3,
        "--batch-size",
        16,
        "--device",
        "cpu",
    )
    _run("compose", "--bank", bank, "--name", "two", "--weights", "forget-0=1,forget-2=1")
    ev = tmp_path / "ev.json"
    _run("eval", "--model", m, "--data", data, "--bank", bank, "--vector", "forget-1", "--json", ev, "--device", "cpu")
    rec = json.loads(ev.read_text())
    assert rec["n_test"] == 20 and "TA_original" in rec  # the remaining classes
    # fused export, parity on real (resized) test images, and serving through the runtime
    b = tmp_path / "bundle"
    _run("export", "onnx", "--model", m, "--bank", bank, "--vectors", "forget-0,forget-1,forget-2,two", "--out", b)
    pj = tmp_path / "parity.json"
    _run("parity", b, "--backends", "onnxruntime,torch", "--device", "cpu", "--data", data, "--limit", 30, "--json", pj)
    par = json.loads(pj.read_text())
    assert par["ok"], par
    from forgetrt.runtime import Runtime, RuntimeConfig
    from forgetrt.train.data import load_data

    ds = load_data(data, image_size=64)
    x, y = ds.test_images()
    model, _ = load_model(m)
    with Runtime.load(b, RuntimeConfig(backend="onnxruntime", device="cpu")) as rt:
        plain = rt.infer(x).logits
        forget = rt.infer(x, {"forget-1": 1.0}).logits
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(plain, ref, rtol=1e-3, atol=1e-3)
    assert not np.allclose(forget, plain)  # the vector changes what the served model says
    # graft: the bare classifier exported alone, the bank grafted onto that ONNX file
    cls_onnx = tmp_path / "classifier.onnx"
    _run("export", "classifier", "--model", m, "--out", cls_onnx, "--bank", bank)
    g = tmp_path / "grafted"
    _run("export", "onnx", "--from-onnx", cls_onnx, "--bank", bank, "--vectors", "forget-0,forget-1", "--out", g)
    with Runtime.load(g, RuntimeConfig(backend="onnxruntime", device="cpu")) as rt:
        np.testing.assert_allclose(rt.infer(x).logits, ref, rtol=1e-3, atol=1e-3)


def test_import_timm_weights_and_declared_contract(tmp_path, data):
    body = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    w = tmp_path / "w.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in body.state_dict().items()}, str(w))  # DDP-style prefix
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(CLASSES) + "\n")
    m = tmp_path / "model"
    out = _run(
        "import-model",
        "--arch",
        "timm:test_resnet",
        "--weights",
        w,
        "--image-size",
        64,
        "--labels",
        f"@{labels}",
        "--normalize",
        "imagenet",
        "--data",
        data,
        "--out",
        m,
    )
    assert "3 classes, input 3x64x64" in out
    model, info = load_model(m)
    assert info.training["imported"]["file"] == "w.safetensors" and len(info.training["imported"]["sha256"]) == 64
    assert info.iospec.mean == (0.485, 0.456, 0.406) and "test_acc" in info.metrics
    x = torch.rand(2, 3, 64, 64)
    mean = torch.tensor(info.iospec.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.iospec.std).view(1, 3, 1, 1)
    with torch.no_grad():  # the folder computes exactly the user's model behind the declared normalization
        torch.testing.assert_close(model(x), body((x - mean) / std))
    bank = tmp_path / "bank"
    _run(
        "train-vector",
        "--model",
        m,
        "--data",
        data,
        "--bank",
        bank,
        "--forget-classes",
        "square",
        "--name",
        "sq",
        "--epochs",
        1,
        "--batch-size",
        16,
        "--device",
        "cpu",
    )
    b = tmp_path / "bundle"
    _run("export", "onnx", "--model", m, "--bank", bank, "--vectors", "sq", "--out", b)
    _run("parity", b, "--backends", "onnxruntime", "--device", "cpu")


def test_import_refuses_what_does_not_fit(tmp_path):
    from forgetrt.train.workflows import import_model

    body = torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=5)
    w = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in body.state_dict().items()}, str(w))
    with pytest.raises(InvalidInputError, match="misshapen"):  # 5-class weights, 3 labels declared
        import_model("torchvision:mobilenet_v3_small", w, tmp_path / "a", labels=CLASSES, image_size=64)
    with pytest.raises(InvalidInputError, match="missing"):
        import_model("timm:test_resnet", w, tmp_path / "b", labels=list("abcde"), image_size=64)
    with pytest.raises(UnknownNameError, match="unknown torchvision model 'resnet_18'.*resnet18"):
        import_model("torchvision:resnet_18", w, tmp_path / "c", labels=CLASSES, image_size=64)
    with pytest.raises(InvalidInputError, match="registry"):
        import_model("timm:hf-hub:someone/model", w, tmp_path / "d", labels=CLASSES, image_size=64)
    r = CliRunner().invoke(
        cli,
        [
            "import-model",
            "--arch",
            "timm:test_resnet",
            "--weights",
            str(w),
            "--image-size",
            "64",
            "--labels",
            "a,b,c",
            "--normalize",
            "0.5,0.5/0.2",
            "--out",
            str(tmp_path / "e"),
        ],
    )
    assert r.exit_code != 0 and "--normalize" in r.output
    pickle_file = tmp_path / "w.pt"
    torch.save(body.state_dict(), pickle_file)
    r = CliRunner().invoke(
        cli,
        [
            "import-model",
            "--arch",
            "torchvision:mobilenet_v3_small",
            "--weights",
            str(pickle_file),
            "--image-size",
            "64",
            "--labels",
            "a,b,c,d,e",
            "--out",
            str(tmp_path / "f"),
        ],
    )
    assert r.exit_code != 0 and "cannot read weights" in r.output and "safetensors" in r.output


def test_fine_tune_from_weights_with_another_head(tmp_path, data):
    body = torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=1000)
    w = tmp_path / "imagenet-like.safetensors"
    save_file({k: v.contiguous() for k, v in body.state_dict().items()}, str(w))
    m = tmp_path / "ft"
    _run(
        "train-model",
        "--arch",
        "torchvision:mobilenet_v3_small",
        "--data",
        data,
        "--image-size",
        48,
        "--init-weights",
        w,
        "--epochs",
        1,
        "--batch-size",
        16,
        "--out",
        m,
        "--device",
        "cpu",
    )
    info = read_model_manifest(m)
    init = info.training["init_weights"]
    assert init["file"] == w.name and init["reinitialized"] == ["classifier.3.bias", "classifier.3.weight"]
    assert info.iospec.shape == (3, 48, 48)


def test_only_plain_classifiers_and_sizes_they_take(tmp_path, data):
    from forgetrt.runtime.architectures import create_model
    from forgetrt.runtime.iospec import IOSpec

    spec = IOSpec(shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3, labels=CLASSES)
    for name in ("raft_small", "lraspp_mobilenet_v3_large", "fasterrcnn_resnet50_fpn"):  # not classifiers
        with pytest.raises(UnknownNameError, match="unknown torchvision classification model"):
            create_model(f"torchvision:{name}", spec)
    m = create_model("timm:vit_tiny_patch16_224", spec)  # built for the declared size
    assert m(torch.rand(1, 3, 32, 32)).shape == (1, 3)
    g = tmp_path / "g"
    _run(
        "train-model",
        "--arch",
        "torchvision:googlenet",
        "--data",
        data,
        "--image-size",
        64,
        "--epochs",
        1,
        "--batch-size",
        16,
        "--out",
        g,
        "--device",
        "cpu",
    )  # no auxiliary heads: plain logits while training
    r = CliRunner().invoke(
        cli,
        [
            "train-model",
            "--arch",
            "torchvision:squeezenet1_0",
            "--data",
            data,
            "--image-size",
            "8",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "s"),
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code != 0 and "does not run on images of 8x8" in r.output and "Traceback" not in r.output
