"""CUDA paths (skipped without a GPU): bf16 + channels-last training and inference agree with CPU."""

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def test_cuda_inference_matches_cpu(digits, digits_model_dir, digits_bank):
    from forgetrt.runtime.bank import VectorBank
    from forgetrt.runtime.model_folder import load_model
    from forgetrt.train.loops import predict_logits

    delta = VectorBank.load(digits_bank[0]).get("forget-3")
    cpu, _ = load_model(digits_model_dir, "cpu")
    gpu, _ = load_model(digits_model_dir, "cuda")
    a = predict_logits(cpu, digits.x_test, digits.scale, delta)
    b = predict_logits(gpu, digits.x_test, digits.scale, delta)
    # CUDA convolutions run in TF32 by default (10-bit mantissa): compare relative to the logits' scale
    assert np.abs(a - b).max() <= 2e-3 * np.abs(a).max()


def test_cuda_training_and_vectors(digits, tmp_path):
    from forgetrt.train import workflows as wf
    from forgetrt.train.recipes import PRESETS

    rec = wf.train_model("digits-cnn", digits, tmp_path / "m", device="cuda")
    assert rec["metrics"]["test_acc"] >= 95 and rec["training"]["device"].startswith("cuda")
    res = wf.train_class_vectors(
        tmp_path / "m", digits, tmp_path / "b", classes=[0, 3], recipe=PRESETS["digits"], device="cuda"
    )
    assert all(r["metrics"]["UA"] >= 90 for r in res)
