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
