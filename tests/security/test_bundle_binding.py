"""A bundle is one unit: editing bundle.json, swapping or adding files, or re-hashing a replaced graph is
refused at load, whichever field or file is touched; a signed bundle that changed is refused too."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from forgetrt.runtime.bundle import Bundle
from forgetrt.runtime.errors import ArtifactError, CorruptArtifactError, MismatchError
from forgetrt.runtime.files import sha256_file


@pytest.fixture(scope="module")
def other_bundle(tmp_path_factory, digits):
    """A second, honest bundle of another model (its own weights and vectors, same file names)."""
    import dataclasses

    from forgetrt.export.onnx_export import export_onnx
    from forgetrt.train import workflows as wf
    from forgetrt.train.recipes import PRESETS

    d = tmp_path_factory.mktemp("other")
    wf.train_model("digits-cnn", digits, d / "m", epochs=2, seed=7, device="cpu")
    r = dataclasses.replace(PRESETS["digits"], epochs=1, calibrate="none")
    wf.train_class_vectors(
        d / "m", digits, d / "bank", classes=[0, 1, 2, 9], recipe=r, device="cpu", evaluate_after=False
    )
    export_onnx(
        d / "bank",
        d / "b",
        model_dir=d / "m",
        vectors=["forget-0", "forget-1", "forget-2"],
        mandatory={"forget-9": 0.5},
        coeff_range=(0.0, 1.0),
        cancel_threshold=0.0,
    )
    return d / "b"


def _copy(src, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    return dst


def _edit(path, fn):
    rec = json.loads((path / "bundle.json").read_text())
    fn(rec)
    (path / "bundle.json").write_text(json.dumps(rec))


def _rehash(path, name):
    _edit(path, lambda r: r["files"].__setitem__(name, sha256_file(path / name)))


EDITS = {
    "mandatory weight": lambda r: r["mandatory"].__setitem__("forget-9", 1.0),
    "mandatory weight tiny": lambda r: r["mandatory"].__setitem__("forget-9", 1e-9),
    "mandatory renamed": lambda r: r.__setitem__("mandatory", {"forget-8": 0.5}),
    "mandatory dropped": lambda r: r.__setitem__("mandatory", {}),
    "mandatory NaN": lambda r: r["mandatory"].__setitem__("forget-9", float("nan")),
    "mandatory inf": lambda r: r["mandatory"].__setitem__("forget-9", float("inf")),
    "vector order": lambda r: r.__setitem__("vectors", [r["vectors"][1], r["vectors"][0], *r["vectors"][2:]]),
    "vector dropped": lambda r: r.__setitem__("vectors", r["vectors"][:-1]),
    "vector renamed": lambda r: r["vectors"].__setitem__(0, "forget-x"),
    "bundle id": lambda r: r.__setitem__("bundle_id", "0123456789ab"),
    "fingerprint": lambda r: r.__setitem__("model_fingerprint", "0" * 64),
    "coeff range widened": lambda r: r.__setitem__("coeff_range", [-100.0, 100.0]),
    "coeff range removed": lambda r: r.__setitem__("coeff_range", None),
    "guard added": lambda r: r.__setitem__("guard_classes", [9]),
    "files emptied": lambda r: r.__setitem__("files", {}),
    "model file unlisted": lambda r: r["files"].pop("model.onnx"),
    "vectors file unlisted": lambda r: r["files"].pop("vectors.safetensors"),
    "file outside": lambda r: r["files"].__setitem__("../model.onnx", r["files"]["model.onnx"]),
    "absolute file": lambda r: r["files"].__setitem__("/etc/passwd", "0" * 64),
    "hidden file": lambda r: r["files"].__setitem__(".x", "0" * 64),
    "hash changed": lambda r: r["files"].__setitem__("model.onnx", "0" * 64),
    "schema 1": lambda r: r.__setitem__("schema_version", 1),
    "kind": lambda r: r.__setitem__("kind", "something"),
    "iospec": lambda r: r["iospec"].__setitem__("shape", [1, 9, 9]),
    "not an object": lambda r: r.clear(),
    # fields that only the manifest records: bound through the graph's digest of the manifest
    "cancel threshold 0": lambda r: r.__setitem__("cancel_threshold", 0.0),
    "cancel threshold NaN": lambda r: r.__setitem__("cancel_threshold", float("nan")),
    "cancel threshold -1": lambda r: r.__setitem__("cancel_threshold", -1),
    "policy weight zeroed": lambda r: r["policies"].__setitem__(next(iter(r["policies"])), {"forget-3": 0.0}),
    "policy to another vector": lambda r: r["policies"].__setitem__(next(iter(r["policies"])), {"forget-4": 1.0}),
    "policy weight not a number": lambda r: r["policies"].__setitem__(next(iter(r["policies"])), {"forget-3": "1"}),
    "input range widened": lambda r: r["iospec"].__setitem__("input_range", [-1000.0, 1000.0]),
    "labels swapped": lambda r: r["iospec"].__setitem__("labels", list(reversed(r["iospec"]["labels"]))),
    "normalization": lambda r: r["iospec"].__setitem__("mean", [0.0]),
    "bank entry": lambda r: next(iter(r["bank_entries"].values())).__setitem__(
        "forgets", {"kind": "class", "classes": [5]}
    ),
    "model verified": lambda r: r.__setitem__("model_verified", not r["model_verified"]),
    "arch": lambda r: r.__setitem__("arch", "resnet18-cifar"),
    "opset": lambda r: r.__setitem__("opset", r["opset"] - 1),
    "opset overflow": lambda r: r.__setitem__("opset", float("inf")),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_edited_manifest_is_refused(digits_bundle, tmp_path, edit):
    b = _copy(digits_bundle, tmp_path)
    _edit(b, EDITS[edit])
    with pytest.raises((ArtifactError, MismatchError, CorruptArtifactError)):
        Bundle.load(b)


@pytest.mark.parametrize("name", ["model.onnx", "vectors.safetensors", "classifier.safetensors", "classifier.json"])
def test_a_file_from_another_bundle_rehashed_is_refused(digits_bundle, other_bundle, tmp_path, name):
    b = _copy(digits_bundle, tmp_path)
    shutil.copyfile(other_bundle / name, b / name)
    _rehash(b, name)
    with pytest.raises((MismatchError, CorruptArtifactError)):
        Bundle.load(b)


@pytest.mark.parametrize("extra", ["notes.txt", "model.plan", ".hidden", "classifier.onnx"])
def test_unlisted_files_are_refused(digits_bundle, tmp_path, extra):
    b = _copy(digits_bundle, tmp_path)
    (b / extra).write_bytes(b"x")
    with pytest.raises(CorruptArtifactError, match="does not list"):
        Bundle.load(b)


def test_symlinked_file_is_refused(digits_bundle, tmp_path):
    b = _copy(digits_bundle, tmp_path)
    (b / "model.onnx").rename(tmp_path / "elsewhere.onnx")
    (b / "model.onnx").symlink_to(tmp_path / "elsewhere.onnx")
    with pytest.raises(ArtifactError):
        Bundle.load(b)


def test_vectors_file_rewritten_to_another_bank_is_refused(digits_bundle, tmp_path):
    """The same names, other values, re-hashed: the graph's vector hashes and initializers disagree."""
    from safetensors.numpy import load, save

    b = _copy(digits_bundle, tmp_path)
    t = load((b / "vectors.safetensors").read_bytes())
    t["forget-9"] = np.zeros_like(t["forget-9"])  # try to disarm the mandatory vector
    (b / "vectors.safetensors").write_bytes(save(t))
    _rehash(b, "vectors.safetensors")
    with pytest.raises(MismatchError, match="metadata disagree"):
        Bundle.load(b)


def test_graph_with_an_overridable_bank_and_mandatory_vectors_is_refused(digits_bundle, tmp_path):
    """Re-declaring forget_bank as an input (and re-hashing) would let callers cancel the mandatory vector."""
    import onnx
    from onnx import TensorProto, helper

    b = _copy(digits_bundle, tmp_path)
    m = onnx.load(str(b / "model.onnx"))
    bank = next(i for i in m.graph.initializer if i.name == "forget_bank")
    m.graph.input.append(helper.make_tensor_value_info("forget_bank", TensorProto.FLOAT, list(bank.dims)))
    onnx.save(m, str(b / "model.onnx"))
    _rehash(b, "model.onnx")
    with pytest.raises(MismatchError, match="override forget_bank"):
        Bundle.load(b)


@pytest.mark.parametrize(
    "key", ["forgetrt.bundle_id", "forgetrt.mandatory", "forgetrt.vector_sha256", "forgetrt.guard", "forgetrt.vectors"]
)
def test_graph_metadata_edited_is_refused(digits_bundle, tmp_path, key):
    import onnx

    b = _copy(digits_bundle, tmp_path)
    m = onnx.load(str(b / "model.onnx"))
    for p in m.metadata_props:
        if p.key == key:
            p.value = p.value + " "
    onnx.save(m, str(b / "model.onnx"))
    _rehash(b, "model.onnx")
    with pytest.raises(MismatchError, match=key.replace(".", r"\.")):
        Bundle.load(b)


@pytest.fixture(scope="module")
def guarded_bundle(tmp_path_factory, digits_bank, digits_model_dir):
    """forget-9 mandatory with the output guard, the other nine selectable in [0, 1]."""
    from forgetrt.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("guarded") / "b"
    export_onnx(
        digits_bank[0],
        out,
        model_dir=digits_model_dir,
        vectors=[f"forget-{c}" for c in range(9)],
        mandatory={"forget-9": 1.0},
        coeff_range=(0.0, 1.0),
        guard=True,
    )
    return out


def _zero_init(m, like: str, name: str):
    from onnx import numpy_helper

    src = next(i for i in m.graph.initializer if i.name == like)
    m.graph.initializer.append(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(src)), name))


def _set_init(m, name: str, value):
    from onnx import numpy_helper

    i = next(i for i in m.graph.initializer if i.name == name)
    i.CopyFrom(numpy_helper.from_array(np.asarray(value, numpy_helper.to_array(i).dtype), name))


def _node(m, name):
    return next(n for n in m.graph.node if n.name == name)


def _rewire_mandatory(m):
    _zero_init(m, "forget_mandatory", "zero_mandatory")
    _node(m, "forget_mandatory_add").input[1] = "zero_mandatory"


def _rewire_guard(m):
    _zero_init(m, "forget_guard_mask", "zero_mask")
    _node(m, "forget_guard_add").input[1] = "zero_mask"


def _skip_prefix(m):
    for n in m.graph.node:  # the classifier reads the raw image instead of the perturbed one
        if not n.name.startswith("forget_"):
            n.input[:] = ["image" if i == "forget_input" else i for i in n.input]


def _mandatory_as_input(m):
    from onnx import TensorProto, helper

    m.graph.input.append(helper.make_tensor_value_info("forget_mandatory", TensorProto.FLOAT, [1, 1, 8, 8]))


def _duplicate_initializer(m):
    _zero_init(m, "forget_mandatory", "forget_mandatory")


GRAPH_EDITS = {
    "guard mask weakened": lambda m: _set_init(m, "forget_guard_mask", np.where(np.arange(10) == 9, -1e-6, 0.0)),
    "guard mask on another class": lambda m: _set_init(m, "forget_guard_mask", np.where(np.arange(10) == 8, -1e9, 0.0)),
    "guard rewired": _rewire_guard,
    "mandatory rewired": _rewire_mandatory,
    "prefix skipped": _skip_prefix,
    "clip widened": lambda m: _set_init(m, "forget_coeff_hi", 1e6),
    "clip removed": lambda m: _node(m, "forget_clip").input.__setitem__(1, "forget_coeff_hi"),
    "mandatory as an input": _mandatory_as_input,
    "duplicate initializer": _duplicate_initializer,
    "delta shape": lambda m: _set_init(m, "forget_delta_shape", [-1, 1, 64, 1]),
}


@pytest.mark.parametrize("edit", list(GRAPH_EDITS))
def test_a_rewired_or_edited_graph_rehashed_is_refused(guarded_bundle, tmp_path, edit):
    """Editing model.onnx and re-hashing it in bundle.json: every value the prefix and guard use is compared
    and every wire checked, so the runtime never serves a graph that drops what its manifest promises."""
    import onnx

    b = _copy(guarded_bundle, tmp_path)
    Bundle.load(b)  # the honest copy loads
    m = onnx.load(str(b / "model.onnx"))
    GRAPH_EDITS[edit](m)
    onnx.save(m, str(b / "model.onnx"))
    _rehash(b, "model.onnx")
    with pytest.raises(MismatchError):
        Bundle.load(b)


def test_corrupt_graph_is_a_typed_error(digits_bundle, tmp_path):
    b = _copy(digits_bundle, tmp_path)
    (b / "model.onnx").write_bytes(b"\x08\x01garbage" * 10)
    _rehash(b, "model.onnx")
    with pytest.raises(CorruptArtifactError, match="not a readable ONNX model"):
        Bundle.load(b)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    for name in ("a", "b"):
        subprocess.run(
            ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(d / f"{name}.pem")],
            check=True,
        )
        subprocess.run(
            ["openssl", "ec", "-in", str(d / f"{name}.pem"), "-pubout", "-out", str(d / f"{name}.pub")],
            check=True,
            capture_output=True,
        )
    return d


@pytest.fixture
def signed(digits_bundle, tmp_path, keys):
    from forgetrt.runtime.signing import sign_bundle

    b = _copy(digits_bundle, tmp_path)
    sign_bundle(b, keys / "a.pem")
    return b


def test_signed_bundle_verifies(signed, keys):
    assert Bundle.load(signed, verify_key=keys / "a.pub").bundle_id


@pytest.mark.parametrize(
    "change",
    ["other key", "edit manifest and rehash", "add file", "drop signature", "garbage signature", "swap file"],
)
def test_a_signed_bundle_that_changed_is_refused(signed, keys, other_bundle, change):
    key = keys / "a.pub"
    if change == "other key":
        key = keys / "b.pub"
    elif change == "edit manifest and rehash":
        _edit(signed, lambda r: r.__setitem__("policies", {"all": {"forget-0": 1.0}}))
    elif change == "add file":
        (signed / "extra.txt").write_text("x")
    elif change == "drop signature":
        (signed / "bundle.sig").unlink()
    elif change == "garbage signature":
        (signed / "bundle.sig").write_text("{}")
    else:
        shutil.copyfile(other_bundle / "classifier.json", signed / "classifier.json")
    with pytest.raises((MismatchError, CorruptArtifactError)):
        Bundle.load(signed, verify_key=key)


def test_sign_cli(digits_bundle, tmp_path, keys):
    from click.testing import CliRunner

    from forgetrt.tools.cli import cli

    b = _copy(digits_bundle, tmp_path)
    r = CliRunner().invoke(cli, ["sign", str(b), "--key", str(keys / "a.pem")])
    assert r.exit_code == 0 and (b / "bundle.sig").is_file()
    r = CliRunner().invoke(cli, ["sign", str(b), "--key", str(tmp_path / "missing.pem")])
    assert r.exit_code == 3 and "private key not found" in r.output
