"""The command line never prints a traceback: each failure is one line and a typed exit code (2 for bad
input, 3 for artifacts, 4 for an unavailable backend), and outputs are checked before long work starts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from forgetrt.runtime.files import sha256_file
from forgetrt.tools.cli import cli


def run(*args, env=None):
    r = CliRunner().invoke(cli, [str(a) for a in args], env=env)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    return r


@pytest.fixture
def corrupt_bundle(digits_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(digits_bundle, b)
    (b / "model.onnx").write_bytes(b"\x08\x07" + b"\xff" * 64)
    rec = json.loads((b / "bundle.json").read_text())
    rec["files"]["model.onnx"] = sha256_file(b / "model.onnx")
    (b / "bundle.json").write_text(json.dumps(rec))
    return b


@pytest.mark.parametrize(
    "cmd",
    [
        ["serve", "{b}", "--device", "cpu"],
        ["parity", "{b}", "--device", "cpu"],
        ["infer", "{b}", "--image", "{img}", "--device", "cpu"],
        ["bench", "{b}", "--device", "cpu", "--duration", "0.1"],
        ["backends", "{b}", "--device", "cpu"],
        ["export", "triton", "--bundle", "{b}", "--repo", "{t}/repo", "--accept-clipping"],
        ["sign", "{b}", "--key", "{t}/k.pem"],
    ],
)
def test_a_corrupt_graph_is_a_clean_error_everywhere(corrupt_bundle, tmp_path, cmd):
    img = tmp_path / "x.npy"
    np.save(img, np.zeros((1, 8, 8), np.float32))
    argv = [a.format(b=corrupt_bundle, img=img, t=tmp_path) for a in cmd]
    r = run(*argv)
    assert r.exit_code == 3 and "not a readable ONNX model" in r.output, r.output


@pytest.mark.parametrize(
    "args, code, msg",
    [
        (["serve", "{bundle}", "--port", "70000"], 2, "70000"),
        (["serve", "{bundle}", "--max-body-bytes", "0", "--device", "cpu"], 2, "must be >= 1"),
        (["serve", "{bundle}", "--body-timeout-s", "nan", "--device", "cpu"], 2, "must be > 0 seconds"),
        (["serve", "{bundle}", "--admin-token-file", "{t}/missing", "--device", "cpu"], 3, "token file not found"),
        (["serve", "{bundle}", "--verify-key", "{t}/missing.pub", "--device", "cpu"], 3, "public key not found"),
        (
            ["export", "onnx", "--model", "{model}", "--bank", "{bank}", "--out", "{t}/o", "--opset", "99"],
            2,
            "opset must be between",
        ),
        (["export", "onnx", "--model", "{model}", "--bank", "{bank}", "--out", "{t}/afile/o"], 3, "not a folder"),
        (
            ["export", "onnx", "--model", "{model}", "--bank", "{bank}", "--out", "{t}/o", "--cancel-threshold", "2"],
            2,
            "2",
        ),
        (
            ["export", "onnx", "--model", "{model}", "--bank", "{bank}", "--out", "{t}/o", "--guard"],
            2,
            "give --mandatory",
        ),
        (["train-model", "--arch", "digits-cnn", "--out", "{t}/afile/m"], 3, "not a folder"),
        (["train-model", "--arch", "digits-cnn", "--out", "{t}/afile"], 2, "is a file"),
        (
            ["train-vector", "--model", "{model}", "--each-class", "--bank", "{t}/afile/b", "--epochs", "1"],
            3,
            "not a folder",
        ),
        (
            [
                "train-vector",
                "--model",
                "{model}",
                "--forget-classes",
                "1",
                "--name",
                "x",
                "--bank",
                "{t}/b",
                "--distill-temperature",
                "inf",
            ],
            2,
            "temperature",
        ),
        (
            [
                "train-vector",
                "--model",
                "{model}",
                "--forget-classes",
                "1",
                "--name",
                "x",
                "--bank",
                "{t}/b",
                "--calibrate",
                "retrain-proxy",
            ],
            2,
            "is for data subsets",
        ),
        (
            [
                "unlearn-baseline",
                "--method",
                "ft",
                "--model",
                "{model}",
                "--forget-classes",
                "1",
                "--out",
                "{t}/afile/u",
            ],
            3,
            "not a folder",
        ),
        (["eval", "--model", "{model}", "--forget-fraction", "0.1", "--mask-forgotten"], 2, "class-wise forget spec"),
        (
            ["compose", "--bank", "{bank}", "--name", "c", "--weights", "forget-0=1", "--init", "zero"],
            2,
            "--init applies to --learn",
        ),
        (["compose", "--bank", "{bank}", "--name", "c", "--learn", "--refine"], 2, "exactly one of"),
        (
            ["compose", "--bank", "{bank}", "--name", "c", "--refine", "--target-classes", "1"],
            2,
            "--refine needs --model",
        ),
        (
            ["compose", "--bank", "{bank}", "--name", "c", "--refine", "--basis", "forget-0", "--model", "{model}"],
            2,
            "--basis applies to --learn only",
        ),
        (
            [
                "compose",
                "--bank",
                "{bank}",
                "--name",
                "c",
                "--refine",
                "--model",
                "{model}",
                "--target-fraction",
                "0.1",
            ],
            2,
            "train a direct vector",
        ),
        (["parity", "{bundle}", "--backends", "tensorrt", "--device", "cpu"], 4, "TensorRT is not installed"),
        (["bench", "{bundle}", "--json", "{t}", "--device", "cpu"], 2, "is a directory"),
        (["infer", "{bundle}", "--image", "{t}/afile", "--device", "cpu"], 2, "cannot read image"),
        (["infer", "{bundle}", "--image", "{t}/empty.npy", "--device", "cpu"], 2, "cannot read"),
        (["infer", "{bundle}", "--image", "{t}/bomb.png", "--device", "cpu"], 2, "cannot read image"),
        (
            ["export", "onnx", "--model", "{model}", "--bank", "{bank}", "--out", "{t}/fifo", "--overwrite"],
            3,
            "not a folder",
        ),
        (
            ["export", "onnx", "--model", "{model}", "--bank", "{bank}", "--out", "{t}/o", "--policies", "{t}/p1.json"],
            2,
            "must be a number",
        ),
        (
            ["export", "onnx", "--model", "{model}", "--bank", "{bank}", "--out", "{t}/o", "--policies", "{t}/p2.json"],
            2,
            "not a finite number",
        ),
        (
            [
                "export",
                "onnx",
                "--model",
                "{model}",
                "--bank",
                "{bank}",
                "--out",
                "{t}/o",
                "--policies",
                "{t}/p3.json",
                "--coeff-range",
                "0,1",
            ],
            2,
            "outside the coefficient range",
        ),
        (["export", "classifier", "--model", "{model}", "--out", "/proc/forgetrt-x.onnx"], 3, "cannot write"),
        (["export", "classifier", "--model", "{model}", "--out", "{t}/fifo"], 3, "not a regular file"),
        (
            ["export", "triton", "--bundle", "{bundle}", "--repo", "/proc/forgetrt-repo", "--accept-clipping"],
            3,
            "cannot write",
        ),
        (["serve", "{bundle}", "--admin-token-file", "{t}/tokbin", "--device", "cpu"], 3, "cannot read the admin"),
        (
            [
                "serve",
                "{bundle}",
                "--admin-token-file",
                "{t}/tok",
                "--bank-root",
                "{t}",
                "--state-dir",
                "{t}/st",
                "--device",
                "cpu",
            ],
            3,
            "cannot hold the audit log",
        ),
    ],
)
def test_bad_input_is_one_typed_line(digits_bundle, digits_model_dir, digits_bank, tmp_path, args, code, msg):
    import os

    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "empty.npy").write_bytes(b"")
    # a PNG header announcing 20000 x 20000 pixels: Pillow's decompression-bomb check
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    (tmp_path / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    )
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "p1.json").write_text(json.dumps({"eu": {"forget-3": "abc"}}))
    (tmp_path / "p2.json").write_text('{"eu": {"forget-3": NaN}}')
    (tmp_path / "p3.json").write_text(json.dumps({"eu": {"forget-3": 7}}))
    (tmp_path / "tokbin").write_bytes(b"\xff\xfe" * 20)
    (tmp_path / "tok").write_text("t" * 32)
    (tmp_path / "st" / "audit.jsonl").mkdir(parents=True)  # the audit log cannot be appended to
    argv = [a.format(bundle=digits_bundle, model=digits_model_dir, bank=digits_bank[0], t=tmp_path) for a in args]
    r = run(*argv)
    assert r.exit_code == code and msg in r.output, r.output
    assert not (tmp_path / "b").exists() and not (tmp_path / "o").exists()  # nothing started, nothing half-written


@pytest.mark.parametrize(
    "damage, msg",
    [
        ("classifier.json junk", "not valid JSON"),
        ("classifier.json binary", "not valid JSON"),
        ("opset overflow", "malformed"),
        ("external data", "external files"),
    ],
)
def test_a_damaged_bundle_is_a_typed_error(digits_bundle, tmp_path, damage, msg):
    import onnx

    b = tmp_path / "b"
    shutil.copytree(digits_bundle, b)
    rec = json.loads((b / "bundle.json").read_text())
    if damage == "classifier.json junk":
        (b / "classifier.json").write_text("{not json")
    elif damage == "classifier.json binary":
        (b / "classifier.json").write_bytes(b"\xff\xfe\x00" * 30)
    elif damage == "opset overflow":
        rec["opset"] = float("inf")
    else:  # the mandatory vector moved to a side file the bundle does not list
        m = onnx.load(str(b / "model.onnx"))
        onnx.save(
            m,
            str(b / "model.onnx"),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location="side.bin",
            size_threshold=0,
        )
        (b / "side.bin").unlink()
    for name in ("classifier.json", "model.onnx"):
        rec["files"][name] = sha256_file(b / name)
    (b / "bundle.json").write_text(json.dumps(rec))
    img = tmp_path / "x.npy"
    np.save(img, np.zeros((1, 8, 8), np.float32))
    for cmd in (["infer", b, "--image", img, "--device", "cpu"], ["parity", b, "--device", "cpu"]):
        r = run(*cmd)
        assert r.exit_code == 3 and msg in r.output, r.output


def test_signing_with_a_key_that_is_not_ec_is_a_typed_error(digits_bundle, tmp_path):
    pytest.importorskip("model_signing")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "rsa.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    b = tmp_path / "b"
    shutil.copytree(digits_bundle, b)
    r = run("sign", b, "--key", tmp_path / "rsa.pem")
    assert r.exit_code == 2 and "elliptic-curve" in r.output, r.output


def test_a_corrupt_cache_file_is_discarded_and_rebuilt(tmp_path, monkeypatch):
    """A decoded-data cache that went bad (truncated, garbage) is rebuilt, never trusted or fatal."""
    from PIL import Image

    from forgetrt.train.data import cache_dir, load_data

    root = tmp_path / "mini"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(10):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / "0.png")
    monkeypatch.setenv("FORGETRT_CACHE_DIR", str(tmp_path / "cache"))
    first = load_data(f"cifar10:{root}")
    (cached,) = (cache_dir() / "datasets").glob("cifar10-*.npz")
    for garbage in (cached.read_bytes()[:100], b"not a zip at all", b""):
        cached.write_bytes(garbage)
        again = load_data(f"cifar10:{root}")
        np.testing.assert_array_equal(again.x_train, first.x_train)
        assert cached.stat().st_size > 1000  # rewritten
