"""The unlearning-quality mechanisms on CPU: the held-out validation split, the distillation term, the norm
budget, strength calibration (class-wise UA target, data-wise Retrain proxy with its no-harm rule) and
the original model's accuracy beside every vector's."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from forgetrt.runtime.bank import VectorBank
from forgetrt.runtime.errors import DataError, InvalidInputError
from forgetrt.runtime.model_folder import load_model, read_model_manifest
from forgetrt.train import workflows as wf
from forgetrt.train.calibrate import calibrate_vector
from forgetrt.train.data import ForgetSpec, ValidationSplit
from forgetrt.train.recipes import PRESETS, VectorRecipe
from forgetrt.train.vectors import _objective


def test_validation_split_is_stratified_seeded_and_recorded(digits, digits_model_dir):
    vs = ValidationSplit(0.1, seed=0)
    idx = vs.indices(digits)
    np.testing.assert_array_equal(idx, ValidationSplit(0.1, seed=0).indices(digits))
    assert not np.array_equal(idx, ValidationSplit(0.1, seed=1).indices(digits))
    counts = np.bincount(digits.y_train[idx], minlength=10)
    per_class = np.bincount(digits.y_train, minlength=10)
    assert np.all(np.abs(counts - np.round(0.1 * per_class)) <= 1)
    man = read_model_manifest(digits_model_dir)  # the conftest model: train_model's default holds out 10%
    assert man.validation == vs.describe(digits) and "val_acc" in man.metrics
    with pytest.raises(InvalidInputError, match="fraction must be in"):
        ValidationSplit(1.0)
    other = digits.subset(1000, seed=3)  # not the data the model's split was drawn from
    with pytest.raises(DataError, match="not the one this validation split was drawn from"):
        ValidationSplit.from_description(man.validation, other)


def test_forget_specs_leave_the_held_out_split_alone(digits):
    held = ValidationSplit(0.1).indices(digits)
    cls = ForgetSpec(classes=(3,)).resolve(digits, held)
    assert not np.isin(cls.forget, held).any() and not np.isin(cls.retain, held).any()
    assert len(cls.forget) + len(cls.retain) + len(held) == len(digits.y_train)
    np.testing.assert_array_equal(cls.held_out, held)
    frac = ForgetSpec(fraction=0.1, seed=1).resolve(digits, held)
    assert not np.isin(frac.forget, held).any() and len(frac.forget) == round(0.1 * (len(digits.y_train) - len(held)))
    with pytest.raises(DataError, match="held-out validation split"):
        ForgetSpec(indices=(int(held[0]),)).resolve(digits, held)
    # without a held-out split a fraction draws exactly what it drew before the split existed
    np.testing.assert_array_equal(
        ForgetSpec(fraction=0.1, seed=1).resolve(digits).forget,
        np.sort(np.random.default_rng(1).choice(len(digits.y_train), round(0.1 * len(digits.y_train)), replace=False)),
    )


def test_distillation_term():
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 4, requires_grad=True)
    y = torch.tensor([[0, 1, 2, 3, 0, 1]])
    is_forget = torch.tensor([[True, False, False, False, False, False]])
    params = torch.zeros(1, 3)
    plain = VectorRecipe()
    kd = VectorRecipe(distill=2.0, distill_temperature=3.0)
    same = _objective(logits, y, is_forget, params, kd, original=logits.detach())
    torch.testing.assert_close(same, _objective(logits, y, is_forget, params, plain))  # KL(p || p) = 0
    other = logits.detach() + torch.randn(1, 6, 4)
    moved = _objective(logits, y, is_forget, params, kd, original=other)
    # the term, written out: κ·T²·Σ_retain KL(softmax(original/T) ‖ softmax(logits/T)) / B
    t, kappa, retain = 3.0, 2.0, ~is_forget[0]
    p_orig = torch.softmax(other[0] / t, -1)
    kl = (p_orig * (torch.log(p_orig) - torch.log_softmax(logits[0].detach() / t, -1))).sum(-1)
    expected = kappa * t * t * kl[retain].sum() / 6
    torch.testing.assert_close((moved - same).detach(), expected.view(1), rtol=1e-5, atol=1e-6)
    moved.sum().backward()
    assert logits.grad.abs().sum() > 0
    # only retain samples pay the term: changing the forget sample's original logits changes nothing
    other2 = other.clone()
    other2[0, 0, 1] += 5.0  # one logit (softmax ignores a shift of the whole row)
    torch.testing.assert_close(_objective(logits, y, is_forget, params, kd, original=other2), moved)
    with pytest.raises(InvalidInputError, match="original model's logits"):
        _objective(logits, y, is_forget, params, kd)


def test_masked_kd_forget_term():
    """forget_loss="masked-kd": forget samples pay β·T²·KL(softmax(m(original)/T) ‖ softmax(logits/T)), m masking
    the sample's own class; retain samples pay nothing new; it pulls the forgotten class's logit down."""
    torch.manual_seed(1)
    logits = torch.randn(1, 5, 4, requires_grad=True)
    y = torch.tensor([[2, 0, 1, 3, 2]])
    is_forget = torch.tensor([[True, False, False, False, True]])
    params = torch.zeros(1, 3)
    original = torch.randn(1, 5, 4)
    t, beta = 1.5, 3.0
    r = VectorRecipe(forget_loss="masked-kd", beta=beta, distill_temperature=t, lam=0.0)
    got = _objective(logits, y, is_forget, params, r, original=original)
    masked = original[0].clone()
    masked[torch.arange(5), y[0]] = float("-inf")
    q = torch.softmax(masked / t, -1)
    logp = torch.log_softmax(logits[0].detach() / t, -1)
    kl = torch.where(q > 0, q * (torch.log(q) - logp), torch.zeros(())).sum(-1)
    ce = torch.nn.functional.cross_entropy(logits[0].detach(), y[0], reduction="none")
    expected = (ce[~is_forget[0]].sum() + beta * t * t * kl[is_forget[0]].sum()) / 5
    torch.testing.assert_close(got.detach(), expected.view(1), rtol=1e-5, atol=1e-6)
    # retain samples' original logits do not enter the forget term (no distillation here); a forget sample's do
    other = original.clone()
    other[0, 1, 2] += 4.0
    torch.testing.assert_close(_objective(logits, y, is_forget, params, r, original=other), got)
    other[0, 0, 1] += 4.0
    assert not torch.allclose(_objective(logits, y, is_forget, params, r, original=other), got)
    # a spec forgetting classes 2 and 3 whole: both are masked out of every forget sample's target
    forgotten = torch.tensor([[False, False, True, True]])
    both = _objective(logits, y, is_forget, params, r, original=original, forgotten=forgotten)
    masked[:, 2:] = float("-inf")
    q2 = torch.softmax(masked / t, -1)
    assert float(q2[:, 2:].sum()) == 0.0
    kl2 = torch.where(q2 > 0, q2 * (torch.log(q2) - logp), torch.zeros(())).sum(-1)
    expected2 = (ce[~is_forget[0]].sum() + beta * t * t * kl2[is_forget[0]].sum()) / 5
    torch.testing.assert_close(both.detach(), expected2.view(1), rtol=1e-5, atol=1e-6)
    # descending the term lowers the forgotten class's share on the forget samples
    got.sum().backward()
    assert bool((logits.grad[0, is_forget[0], y[0][is_forget[0]]] > 0).all())
    with pytest.raises(InvalidInputError, match="original model's logits"):
        _objective(logits, y, is_forget, params, r)


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"distill": -1.0}, "distill must be >= 0"),
        ({"distill": 1.0, "distill_temperature": float("inf")}, "temperature > 0"),
        ({"lr": float("inf")}, "lr must be finite"),
        ({"norm_budget": float("nan")}, "norm budget must be > 0"),
        ({"norm_budget": 0.0}, "norm budget must be > 0"),
        ({"val_fraction": 0.0}, "validation fraction"),
        ({"calibrate": "magic"}, "unknown calibration 'magic'"),
        ({"forget_loss": "hinge"}, "unknown forget loss 'hinge'"),
        ({"ua_target": 101.0}, "UA target"),
        ({"strengths": (0.5, -1.0)}, "strengths must be positive"),
    ],
)
def test_recipe_rejects_bad_quality_settings(kw, msg):
    with pytest.raises((InvalidInputError, KeyError), match=msg):
        VectorRecipe(**kw)


def test_norm_budget_and_carved_validation(tmp_path, digits):
    """A model that holds nothing out: vectors validate on a split carved from its training data (recorded,
    never trained on); the norm budget bounds δ as served, calibration and compositions included."""
    wf.train_model("digits-cnn", digits, tmp_path / "m", epochs=3, device="cpu", val_fraction=None)
    assert read_model_manifest(tmp_path / "m").validation is None
    r = dataclasses.replace(PRESETS["digits"], epochs=2, norm_budget=0.5, strengths=(1.0, 2.0, 4.0), ua_target=100.0)
    res = wf.train_vector(tmp_path / "m", digits, tmp_path / "b", {"v": ForgetSpec(classes=(4,))}, r, device="cpu")
    bank = VectorBank.load(tmp_path / "b")
    assert np.linalg.norm(bank.get("v")) <= 0.5 + 1e-4, res[0]["calibration"]  # even if calibration wants more
    val = bank.entry("v").recipe["validation"]
    assert val == {"source": "carved", **ValidationSplit(r.val_fraction, r.seed).describe(digits)}
    learned = wf.compose_learned(
        tmp_path / "b",
        "c",
        tmp_path / "m",
        digits,
        ForgetSpec(classes=(4,)),
        dataclasses.replace(r, norm_budget=0.1),
        basis=["v"],
        device="cpu",
    )
    assert np.linalg.norm(VectorBank.load(tmp_path / "b").get("c")) <= 0.1 + 1e-4, learned
    # data-wise calibration needs held-out data: without it, no vector is the choice that cannot do harm
    r2 = dataclasses.replace(PRESETS["paper"], epochs=1)
    res = wf.train_vector(tmp_path / "m", digits, tmp_path / "b", {"r": ForgetSpec(fraction=0.1)}, r2, device="cpu")
    assert res[0]["strength"] == 0.0 and "holds out no validation split" in res[0]["calibration"]["reason"]
    assert np.all(VectorBank.load(tmp_path / "b").get("r") == 0)


def test_vectors_never_see_the_validation_images(digits, digits_model_dir):
    """Replacing the validation images with noise changes nothing in training: they are never drawn."""
    from forgetrt.train.vectors import train_vectors

    model, _ = load_model(digits_model_dir)
    carved = ValidationSplit(0.2, seed=5).indices(digits)
    noisy = dataclasses.replace(digits, x_train=digits.x_train.copy())
    noisy.x_train[carved] = np.random.default_rng(0).integers(0, 17, noisy.x_train[carved].shape, dtype=np.uint8)
    r = dataclasses.replace(PRESETS["digits"], epochs=1)
    specs = {"v": ForgetSpec(classes=(2,))}
    a = train_vectors(model, digits, specs, r, exclude=carved)[0].vector
    b = train_vectors(model, noisy, specs, r, exclude=carved)[0].vector
    c = train_vectors(model, noisy, specs, r)[0].vector  # the control: with the noise in play, δ changes
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_ua_target_picks_the_smallest_strength_that_forgets(digits, digits_model_dir, digits_bank, scale):
    """The walk from the strength nearest 1 (down for a vector that forgets at 1, up for a weak one, here
    the same vector scaled by 0.3) picks what measuring every strength picks, measuring fewer of them."""
    model, info = load_model(digits_model_dir)
    held = ValidationSplit.from_description(info.validation, digits).indices(digits)
    split = ForgetSpec(classes=(7,)).resolve(digits, held)
    delta = scale * VectorBank.load(digits_bank[0]).get("forget-7")
    r = dataclasses.replace(PRESETS["digits"], strengths=(0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0))
    cal = calibrate_vector(model, digits, split, delta, r, val_idx=held, val_held_out=True)
    grid = r.strengths + tuple((a + b) / 2 for a, b in zip(r.strengths, r.strengths[1:]))  # with the midpoints
    alone = {  # each strength measured on its own (the same seeded samples)
        s: calibrate_vector(
            model, digits, split, delta, dataclasses.replace(r, strengths=(s,)), val_idx=held, val_held_out=True
        ).grid[0]
        for s in grid
    }
    assert not alone[0.1]["meets"] and alone[4.0]["meets"]  # the target lies inside the grid
    assert cal.mode == "ua-target" and cal.reached
    first = min(s for s in r.strengths if alone[s]["meets"])  # then one bisection step below it
    below = max(s for s in r.strengths if s < first)
    mid = (below + first) / 2
    assert cal.strength == (mid if alone[mid]["meets"] else first)
    assert mid in [g["strength"] for g in cal.grid]
    assert 3 <= len(cal.grid) < len(r.strengths)
    assert all(g == alone[g["strength"]] for g in cal.grid)  # the same measurements, ascending
    assert [g["strength"] for g in cal.grid] == sorted(g["strength"] for g in cal.grid)
    assert all("UA_val" in g and "val_acc_drop" in g for g in cal.grid)
    unreachable = calibrate_vector(
        model, digits, split, delta, dataclasses.replace(r, strengths=(0.01, 0.02)), val_idx=held, val_held_out=True
    )
    assert unreachable.reached is False and "no strength reached" in unreachable.reason
    assert [g["strength"] for g in unreachable.grid] == [0.01, 0.02]  # missed everywhere: the whole grid


@pytest.mark.parametrize(
    "ua, strength, measured",
    [
        (lambda s: 100.0 if s >= 1.25 else 50.0, 1.25, [1.0, 1.125, 1.1875, 1.25]),  # up from 1, bisect
        (lambda s: 100.0 if s >= 1.3 else 50.0, 1.375, [1.0, 1.125, 1.25, 1.375, 1.5]),  # the midpoint meets
        (lambda s: 100.0 if s >= 0.5 else 50.0, 0.5, [0.25, 0.375, 0.5, 0.75, 0.875, 1.0]),  # down from 1
        (lambda s: 98.0 if s >= 0.5 else 50.0, 0.5, None),  # missed everywhere, flat: the least damaging best
        (lambda s: 100.0, 0.25, [0.25, 0.5, 0.75, 0.875, 1.0]),  # met down to the grid's floor
    ],
)
def test_the_walk_over_the_strength_grid(monkeypatch, ua, strength, measured):
    """The walk's logic with a stand-in for the model: UA as a function of the strength."""
    from types import SimpleNamespace

    from forgetrt.train import calibrate

    class Probe:
        def __init__(self, model, ds, delta, sets):
            pass

        def acc(self, name, s):
            return 90.0 - s if name == "val_rest" else 100.0 - ua(s)

    monkeypatch.setattr(calibrate, "_Probe", Probe)
    y = np.repeat(np.arange(10), 50)
    ds = SimpleNamespace(y_train=y)
    split = SimpleNamespace(classes=(3,), forget=np.flatnonzero(y == 3)[:40])
    val = np.flatnonzero(np.arange(500) % 10 == 0)
    r = PRESETS["digits"]  # strengths 0.25 ... 2
    cal = calibrate._ua_target(None, ds, split, np.zeros(4, np.float32), r, val, np.random.default_rng(0))
    assert cal.strength == strength and cal.reached == (ua(2.0) >= r.ua_target)
    assert [g["strength"] for g in cal.grid] == (measured or sorted(r.strengths))


def test_retrain_proxy_keeps_no_vector_for_one_that_only_costs_accuracy(digits, digits_model_dir):
    """A small random δ costs some accuracy and moves nothing else: no strength is clearly better than none."""
    model, info = load_model(digits_model_dir)
    held = ValidationSplit.from_description(info.validation, digits).indices(digits)
    split = ForgetSpec(fraction=0.1, seed=2).resolve(digits, held)
    noise = np.random.default_rng(0).normal(0, 0.15, digits.shape).astype(np.float32)
    cal = calibrate_vector(model, digits, split, noise, PRESETS["paper"], val_idx=held, val_held_out=True)
    assert cal.mode == "retrain-proxy" and cal.strength == 0.0 and cal.grid[0]["strength"] == 0.0
    assert max(g["TA"] for g in cal.grid[1:]) < cal.grid[0]["TA"] or min(g["RA"] for g in cal.grid[1:]) < 100
    assert set(cal.targets) == {"UA", "RA", "TA", "MIA_efficacy"}


def test_a_vector_must_beat_no_vector_by_more_than_the_noise():
    from forgetrt.train.calibrate import choose_over_no_vector

    def grid(gap, se):
        return [
            {"strength": 0.0, "proxy_gap": 5.0, "proxy_gap_se": 0.3},
            {"strength": 0.5, "proxy_gap": gap, "proxy_gap_se": se},
        ]

    assert choose_over_no_vector(grid(4.5, 0.3)) is None  # 0.5 better, but within 2 standard errors
    assert choose_over_no_vector(grid(4.0, 0.3))["strength"] == 0.5
    assert choose_over_no_vector(grid(6.0, 0.1)) is None


@pytest.mark.parametrize(
    "spec, calibrate, msg",
    [
        (ForgetSpec(fraction=0.1), "ua-target", "is for class-wise"),
        (ForgetSpec(classes=(1,)), "retrain-proxy", "is for data subsets"),
    ],
)
def test_a_calibration_that_does_not_fit_the_spec_is_refused_before_training(
    tmp_path, digits, digits_model_dir, spec, calibrate, msg
):
    r = dataclasses.replace(PRESETS["paper"], calibrate=calibrate)
    with pytest.raises(InvalidInputError, match=msg):
        wf.train_vector(digits_model_dir, digits, tmp_path / "b", {"x": spec}, r, device="cpu")
    assert not (tmp_path / "b").exists()


def test_default_data_wise_vector_does_no_harm_against_retrain(tmp_path, digits, digits_model_dir):
    """Random 10% with the default recipe: Avg.Gap to Retrain no worse than serving no vector at all, where
    the vector as trained is far worse (the case the calibration exists for)."""
    spec = ForgetSpec(fraction=0.1, seed=3)
    wf.unlearn_baseline("retrain", digits_model_dir, digits, spec, tmp_path / "retrain", device="cpu")
    ref = wf.evaluate_result(tmp_path / "retrain", digits, device="cpu")
    none = wf.evaluate_result(digits_model_dir, digits, forget=spec, device="cpu", reference=ref)
    raw = dataclasses.replace(VectorRecipe(), calibrate="none")
    wf.train_vector(digits_model_dir, digits, tmp_path / "b", {"raw": spec}, raw, device="cpu")
    res = wf.train_vector(digits_model_dir, digits, tmp_path / "b", {"r10": spec}, VectorRecipe(), device="cpu")
    ev = {"bank_dir": tmp_path / "b", "device": "cpu", "reference": ref}
    as_trained = wf.evaluate_result(digits_model_dir, digits, vector="raw", **ev)
    vec = wf.evaluate_result(digits_model_dir, digits, vector="r10", **ev)
    assert as_trained["avg_gap"] > none["avg_gap"] + 5  # the trained vector alone does harm
    assert res[0]["calibration"]["mode"] == "retrain-proxy"
    assert vec["avg_gap"] <= none["avg_gap"], (res[0]["calibration"]["reason"], vec, none)
    if res[0]["strength"] == 0.0:  # no vector served: exactly the original's behaviour
        assert np.all(VectorBank.load(tmp_path / "b").get("r10") == 0) and vec["avg_gap"] == none["avg_gap"]


def test_eval_reports_the_original_accuracy_beside_the_vector(tmp_path, digits_model_dir, digits_bank):
    from click.testing import CliRunner

    from forgetrt.tools.cli import cli

    out = tmp_path / "v.json"
    args = ["eval", "--model", digits_model_dir, "--bank", digits_bank[0], "--vector", "forget-2", "--json", out]
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0 and "TA_original" in r.output and "TA_drop" in r.output, r.output
    v = json.loads(out.read_text())
    assert v["TA_drop"] == pytest.approx(v["TA_original"] - v["TA"]) and v["TA_original"] >= 95.0


def test_eval_can_mask_the_forgotten_class_at_the_output(tmp_path, digits_model_dir):
    from click.testing import CliRunner

    from forgetrt.tools.cli import cli

    out = tmp_path / "m.json"
    args = ["eval", "--model", digits_model_dir, "--forget-classes", "4", "--mask-forgotten", "--json", out]
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text())
    assert m["UA"] == 100.0 and m["MIA_efficacy"] == 100.0 and m["evaluated"] == "model + output mask"
    r = CliRunner().invoke(
        cli, [str(a) for a in ["eval", "--model", digits_model_dir, "--forget-fraction", "0.1", "--mask-forgotten"]]
    )
    assert r.exit_code == 2 and "needs a class-wise forget spec" in r.output
