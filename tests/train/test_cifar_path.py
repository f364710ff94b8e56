"""The CIFAR-10 path end to end on a small random subset of the shared archive (CPU, cifar-small):
plumbing, not accuracy; the accuracy bars are benchmarks/unlearning_cifar10.py's job on a GPU."""

import pytest

pytestmark = pytest.mark.needs_data


def test_cifar_subset_model_vector_eval(tmp_path):
    from conftest import CIFAR_TAR

    from forgetrt.train import workflows as wf
    from forgetrt.train.data import load_data
    from forgetrt.train.recipes import VectorRecipe

    ds = load_data(f"cifar10:{CIFAR_TAR}").subset(1500, 500, seed=0)
    rec = wf.train_model("cifar-small", ds, tmp_path / "m", epochs=1, device="cpu")
    assert list(rec["iospec"]["shape"]) == [3, 32, 32] and rec["iospec"]["labels"][3] == "cat"
    res = wf.train_class_vectors(
        tmp_path / "m", ds, tmp_path / "b", classes=["cat"], recipe=VectorRecipe(epochs=1), device="cpu"
    )
    assert res[0]["name"] == "forget-3"
    m = wf.evaluate_result(tmp_path / "m", ds, bank_dir=tmp_path / "b", vector="forget-3", device="cpu")
    for k in ("UA", "RA", "TA", "TA_forgotten", "MIA_efficacy"):
        assert 0.0 <= m[k] <= 100.0
    assert m["forgets"]["labels"] == ["cat"]


def test_cifar_subset_quality_mechanisms(tmp_path):
    """cifar-small on a CIFAR-10 subset: the held-out split stays out of every set, a distilled, masked-kd and
    calibrated class vector is tuned on it, a random-subset vector is calibrated against no vector."""
    import dataclasses

    import numpy as np
    from conftest import CIFAR_TAR

    from forgetrt.runtime.bank import VectorBank
    from forgetrt.train import workflows as wf
    from forgetrt.train.data import ForgetSpec, load_data
    from forgetrt.train.recipes import PRESETS

    ds = load_data(f"cifar10:{CIFAR_TAR}").subset(2000, 500, seed=1)
    rec = wf.train_model("cifar-small", ds, tmp_path / "m", epochs=2, device="cpu", val_fraction=0.1)
    held = wf.held_out_indices(tmp_path / "m", ds)
    assert len(held) == rec["validation"]["count"] and 0 <= rec["metrics"]["val_acc"] <= 100
    split = ForgetSpec(classes=("ship",)).resolve(ds, held)
    assert not np.isin(held, np.concatenate([split.forget, split.retain])).any()
    recipe = dataclasses.replace(PRESETS["cifar-masked"], epochs=1)
    res = wf.train_class_vectors(tmp_path / "m", ds, tmp_path / "b", classes=["ship"], recipe=recipe, device="cpu")
    cal = res[0]["calibration"]
    ships_held = int((ds.y_train[held] == 8).sum())
    assert cal["mode"] == "ua-target" and ships_held > 0 and all("UA_val" in g for g in cal["grid"])
    met = [g["strength"] for g in cal["grid"] if g["meets"]]
    assert cal["strength"] == (met[0] if met else cal["strength"]) and cal["reached"] == bool(met)
    entry = VectorBank.load(tmp_path / "b").entry("forget-8")
    assert entry.recipe["distill"] == 4.0 and entry.recipe["validation"]["source"] == "model"
    assert entry.recipe["forget_loss"] == "masked-kd"
    assert entry.metrics["n_forget"] == len(split.forget)  # evaluated on the same forget set it was tuned for
    spec = ForgetSpec(fraction=0.05, seed=0)
    r = dataclasses.replace(PRESETS["paper"], epochs=1)
    res = wf.train_vector(tmp_path / "m", ds, tmp_path / "b", {"r5": spec}, r, device="cpu")
    cal = res[0]["calibration"]
    assert cal["mode"] == "retrain-proxy" and cal["grid"][0]["strength"] == 0.0 and "proxy_gap_se" in cal["grid"][1]
