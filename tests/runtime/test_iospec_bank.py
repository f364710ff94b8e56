import json

import numpy as np
import pytest

from forgetrt.runtime import (
    ArtifactError,
    CorruptArtifactError,
    InvalidInputError,
    IOSpec,
    MismatchError,
    UnknownNameError,
    VectorBank,
)

SPEC = IOSpec(shape=(1, 4, 4), mean=(0.5,), std=(0.25,), labels=("a", "b", "c"))


def _bank(tmp_path, n=2):
    bank = VectorBank.create("f" * 64, "toy", SPEC)
    rng = np.random.default_rng(0)
    for i in range(n):
        bank.add(
            f"v{i}",
            rng.normal(size=(1, 4, 4)).astype(np.float32),
            forgets={"kind": "class", "classes": [i]},
            recipe={"lr": 0.2},
        )
    bank.save(tmp_path / "bank")
    return bank


def test_iospec_roundtrip_and_validation():
    assert IOSpec.from_dict(json.loads(json.dumps(SPEC.to_dict()))) == SPEC
    assert SPEC.numel == 16 and SPEC.num_classes == 3
    with pytest.raises(InvalidInputError, match="one value per channel"):
        IOSpec(shape=(3, 4, 4), mean=(0.5,), std=(0.25,), labels=("a", "b"))
    with pytest.raises(InvalidInputError, match="std"):
        IOSpec(shape=(1, 4, 4), mean=(0.5,), std=(0.0,), labels=("a", "b"))
    with pytest.raises(InvalidInputError, match="unique"):
        IOSpec(shape=(1, 4, 4), mean=(0.5,), std=(1.0,), labels=("a", "a"))
    with pytest.raises(CorruptArtifactError):
        IOSpec.from_dict({"shape": [1, 4]})


def test_bank_roundtrip_preserves_order_values_and_entries(tmp_path):
    bank = _bank(tmp_path, 3)
    loaded = VectorBank.load(tmp_path / "bank")
    assert loaded.names == ["v0", "v1", "v2"]
    for n in bank.names:
        np.testing.assert_array_equal(loaded.get(n), bank.get(n))
    assert loaded.entry("v1").forgets == {"kind": "class", "classes": [1]}
    np.testing.assert_allclose(loaded.combine({"v0": 2.0, "v2": -1.0}), 2 * bank.get("v0") - bank.get("v2"), rtol=1e-6)
    assert loaded.stack(["v2", "v0"]).shape == (2, 16)
    # no temporary files are left behind by the atomic writes
    assert sorted(p.name for p in (tmp_path / "bank").iterdir()) == ["manifest.json", "vectors.safetensors"]


def test_bank_rejects_bad_vectors(tmp_path):
    bank = _bank(tmp_path)
    with pytest.raises(InvalidInputError, match="shape"):
        bank.add("bad", np.zeros((1, 5, 5), np.float32), forgets={}, recipe={})
    with pytest.raises(InvalidInputError, match="NaN"):
        bank.add("bad", np.full((1, 4, 4), np.nan, np.float32), forgets={}, recipe={})
    with pytest.raises(InvalidInputError, match="already exists"):
        bank.add("v0", np.zeros((1, 4, 4), np.float32), forgets={}, recipe={})
    with pytest.raises(InvalidInputError, match="invalid vector name"):
        bank.add("../evil", np.zeros((1, 4, 4), np.float32), forgets={}, recipe={})
    with pytest.raises(UnknownNameError, match="unknown vector 'nope'; valid: v0, v1"):
        bank.get("nope")
    with pytest.raises(InvalidInputError, match="finite"):
        bank.combine({"v0": float("inf")})
    assert bank.names == ["v0", "v1"]  # nothing changed


def test_bank_model_mismatch_names_both(tmp_path):
    bank = _bank(tmp_path)
    with pytest.raises(MismatchError, match="ffffffff.*aaaaaaaa"):
        bank.check_model("a" * 64, SPEC)
    with pytest.raises(MismatchError, match="shape"):
        bank.check_model("f" * 64, IOSpec(shape=(1, 8, 8), mean=(0.5,), std=(0.25,), labels=("a", "b", "c")))
    bank.check_model("f" * 64, SPEC)


def test_bank_load_errors(tmp_path):
    _bank(tmp_path)
    d = tmp_path / "bank"
    with pytest.raises(ArtifactError, match="not found"):
        VectorBank.load(tmp_path / "missing")
    # tampered tensors file: detected by the manifest's sha256
    raw = (d / "vectors.safetensors").read_bytes()
    (d / "vectors.safetensors").write_bytes(raw[:-4] + b"\x00\x00\x80\x7f")
    with pytest.raises(CorruptArtifactError, match="sha256"):
        VectorBank.load(d)
    (d / "vectors.safetensors").write_bytes(raw)
    VectorBank.load(d)
    # corrupt manifest
    good = (d / "manifest.json").read_text()
    (d / "manifest.json").write_text(good[: len(good) // 2])
    with pytest.raises(CorruptArtifactError, match="not valid JSON"):
        VectorBank.load(d)
    m = json.loads(good)
    m["schema_version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CorruptArtifactError, match="schema_version"):
        VectorBank.load(d)


def test_bank_corrupt_safetensors_with_matching_hash(tmp_path):
    """A garbage tensors file whose hash was (maliciously or carelessly) recorded still fails cleanly."""
    from forgetrt.runtime.files import sha256_file

    _bank(tmp_path)
    d = tmp_path / "bank"
    (d / "vectors.safetensors").write_bytes(b"not a safetensors file at all")
    m = json.loads((d / "manifest.json").read_text())
    m["vectors_sha256"] = sha256_file(d / "vectors.safetensors")
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CorruptArtifactError, match="cannot read"):
        VectorBank.load(d)
