"""Mandatory vectors cannot be cancelled with allowed requests: export refuses selectable sets that could
(copies, scaled or negated copies, near-duplicates, combinations), hot swaps that would bring such vectors
in are refused, the shipped graph takes no foreign bank, and with the output guard a black-box search over
the allowed coefficients never brings the forgotten class back."""

from __future__ import annotations

import numpy as np
import pytest

from forgetrt.runtime.errors import InvalidInputError, MismatchError


@pytest.fixture(scope="module")
def attack_bank(tmp_path_factory, digits_bank):
    """The digits bank plus crafted vectors built from forget-9 (the mandatory one)."""
    from forgetrt.runtime.bank import VectorBank

    bank = VectorBank.load(digits_bank[0])
    d9 = bank.get("forget-9")
    rng = np.random.default_rng(0)
    r = rng.normal(0, 1, d9.shape).astype(np.float32) * float(np.linalg.norm(d9)) / np.sqrt(d9.size) * 3
    crafted = {
        "copy": d9,
        "negated": -d9,
        "scaled": 0.1 * d9,
        "noisy": d9
        + 0.1 * float(np.linalg.norm(d9)) / np.sqrt(d9.size) * rng.normal(0, 1, d9.shape).astype(np.float32),
        "half-a": 0.5 * d9 + r,
        "half-b": 0.5 * d9 - r,
    }
    for name, v in crafted.items():
        bank.add(name, v.astype(np.float32), forgets={"kind": "class", "classes": [9]}, recipe={"method": "crafted"})
    out = tmp_path_factory.mktemp("attack-bank")
    bank.save(out)
    return out


BENIGN = [f"forget-{c}" for c in range(9)]


@pytest.mark.parametrize("weight", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("attack", [["copy"], ["negated"], ["scaled"], ["noisy"], ["half-a", "half-b"]])
def test_export_refuses_selectable_vectors_that_cancel_the_mandatory_one(
    attack_bank, digits_model_dir, tmp_path, weight, attack
):
    from forgetrt.export.onnx_export import export_onnx

    with pytest.raises(MismatchError, match="near-duplicates|can cancel"):
        export_onnx(
            attack_bank,
            tmp_path / "b",
            model_dir=digits_model_dir,
            vectors=BENIGN + attack,
            mandatory={"forget-9": weight},
            coeff_range=(-2.0, 2.0),
        )
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("scale", [10.0, 3000.0, 1e5])
def test_badly_conditioned_pairs_cannot_hide_a_cancellation(digits_bank, scale):
    """Two huge, nearly opposite vectors whose sum is -δ_mandatory: an iterative solver stopped early
    reported a residual of 0.96 at scale 3000 (an attacker's bank got through); the exact solve finds 0."""
    from forgetrt.runtime.bank import VectorBank
    from forgetrt.runtime.guards import DEFAULT_CANCEL_THRESHOLD, cancellation, check_cancellation

    d9 = VectorBank.load(digits_bank[0]).get("forget-9").astype(np.float64)
    rng = np.random.default_rng(1)
    r = rng.normal(0, 1, d9.shape)
    r -= (r.ravel() @ d9.ravel()) / (d9.ravel() @ d9.ravel()) * d9  # perpendicular to δ9
    r *= scale * np.linalg.norm(d9) / np.linalg.norm(r)
    pair = np.stack([-d9 / 2 + r, -d9 / 2 - r]).astype(np.float32)
    assert cancellation(pair, d9, (0.0, 1.0)).residual < 0.05
    with pytest.raises(MismatchError, match="can cancel"):
        check_cancellation(pair, d9, (0.0, 1.0), DEFAULT_CANCEL_THRESHOLD, selectable_names=("evil-a", "evil-b"))


def test_a_combination_is_harmless_where_the_range_forbids_cancelling_it(attack_bank, digits_model_dir, tmp_path):
    """half-a + half-b = δ9 cancels only with negative coefficients; a range of [0, 1] forbids them."""
    from forgetrt.export.onnx_export import export_onnx
    from forgetrt.runtime.bundle import Bundle

    export_onnx(
        attack_bank,
        tmp_path / "b",
        model_dir=digits_model_dir,
        vectors=["half-a", "half-b"],
        mandatory={"forget-9": 1.0},
        coeff_range=(0.0, 1.0),
    )
    assert Bundle.load(tmp_path / "b").manifest.parity["cancellation_residual"] >= 0.8
    with pytest.raises(MismatchError, match="can cancel"):
        export_onnx(
            attack_bank,
            tmp_path / "c",
            model_dir=digits_model_dir,
            vectors=["half-a", "half-b"],
            mandatory={"forget-9": 1.0},
            coeff_range=(-1.0, 1.0),
        )


def test_the_threshold_is_a_knowing_choice(attack_bank, digits_model_dir, tmp_path):
    from forgetrt.export.onnx_export import export_onnx

    export_onnx(
        attack_bank,
        tmp_path / "b",
        model_dir=digits_model_dir,
        vectors=["half-a", "half-b"],
        mandatory={"forget-9": 1.0},
        coeff_range=(-1.0, 1.0),
        cancel_threshold=0.0,
    )
    with pytest.raises(InvalidInputError, match="cancel threshold"):
        export_onnx(
            attack_bank, tmp_path / "c", model_dir=digits_model_dir, mandatory={"forget-9": 1.0}, cancel_threshold=1.5
        )


@pytest.mark.parametrize("scale", [-1.0, -0.5, 0.25, 1.0])
def test_hot_swap_refuses_a_cancelling_vector(digits_bundle, scale):
    from forgetrt.runtime import Runtime, RuntimeConfig
    from forgetrt.runtime.bundle import Bundle

    b = Bundle.load(digits_bundle)
    d9 = b.mandatory_vectors()["forget-9"]  # weight included
    with Runtime.load(b, RuntimeConfig(backend="onnxruntime", device="cpu")) as rt:
        before = rt.snapshot
        with pytest.raises(MismatchError):
            rt.add_vector("sneaky", scale * d9)
        with pytest.raises(MismatchError):
            rt.add_vector("forget-0", scale * d9, replace=True)
        assert rt.snapshot is before


def test_hot_swap_refuses_a_bank_with_a_cancelling_vector(digits_bundle, attack_bank):
    from forgetrt.runtime import Runtime, RuntimeConfig

    with Runtime.load(digits_bundle, RuntimeConfig(backend="onnxruntime", device="cpu")) as rt:
        with pytest.raises(MismatchError):
            rt.reload_bank(attack_bank, vectors=BENIGN + ["negated"])
        assert rt.snapshot.version == 0
        rt.reload_bank(attack_bank, vectors=BENIGN)  # the benign ones are fine
        assert rt.snapshot.version == 1


def test_the_shipped_graph_takes_no_foreign_bank(digits_bundle):
    import onnxruntime as ort

    from forgetrt.runtime.bundle import Bundle

    b = Bundle.load(digits_bundle)
    sess = ort.InferenceSession(str(b.onnx_path), providers=["CPUExecutionProvider"])
    assert sess.get_overridable_initializers() == []
    x = np.zeros((1, 1, 8, 8), np.float32)
    c = np.zeros((1, 9), np.float32)
    stacked, _ = b.vector_arrays()
    with pytest.raises(Exception, match="forget_bank|Invalid input"):  # noqa: B017 - onnxruntime's own error types
        sess.run(None, {"image": x, "coeffs": c, "forget_bank": -stacked})


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, digits_model_dir, digits_bank):
    from forgetrt.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("guarded") / "b"
    export_onnx(
        digits_bank[0],
        out,
        model_dir=digits_model_dir,
        vectors=BENIGN,
        mandatory={"forget-9": 1.0},
        coeff_range=(-1.0, 1.0),
        guard=True,
    )
    return out


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_black_box_coefficient_search_never_restores_a_guarded_class(guarded, digits, backend, seed):
    """300 random allowed coefficient rows per seed, each on the class-9 test images: never predicted 9."""
    from forgetrt.runtime import Runtime, RuntimeConfig

    x = (digits.x_test[digits.y_test == 9] / digits.scale).astype(np.float32)[:32]
    rng = np.random.default_rng(seed)
    with Runtime.load(guarded, RuntimeConfig(backend=backend, device="cpu")) as rt:
        assert rt.bundle.manifest.guard_classes == (9,)
        for _ in range(10):
            rows = rng.uniform(-1, 1, (30, 9)).astype(np.float32)
            for row in rows:
                pred = rt.infer(x, coeffs=row).predictions
                assert not (pred == 9).any()


def test_guard_is_parity_checked_and_needs_class_wise_mandatory_vectors(
    guarded, digits_model_dir, digits_bank, tmp_path
):
    from forgetrt.export.onnx_export import export_onnx
    from forgetrt.export.parity import run_parity

    rep = run_parity(guarded, ["onnxruntime", "torch"], device="cpu")
    assert rep["ok"] and all("guard_missing" not in v["synthetic"] for v in rep["backends"].values())
    with pytest.raises(InvalidInputError, match="give --mandatory"):
        export_onnx(digits_bank[0], tmp_path / "x", model_dir=digits_model_dir, guard=True)
