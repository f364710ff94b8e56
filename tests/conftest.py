"""Shared fixtures: the digits data set, a trained digits model, a bank of class vectors (session-scoped,
trained once with the 'digits' preset), and skip rules for the gpu / trt / needs_data markers."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CIFAR_TAR = Path(
    os.environ.get("FORGETRT_CIFAR10", REPO.parent / "shared" / "datasets" / "cifar10" / "cifar10-jpeg.tar.gz")
)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reasons = {
        "gpu": None if _cuda() else "needs a CUDA device; none here",
        "trt": None if importlib.util.find_spec("tensorrt") else "TensorRT is not installed (only from NVIDIA's index)",
        "needs_data": None
        if CIFAR_TAR.is_file()
        else f"CIFAR-10 archive not found at {CIFAR_TAR} (set FORGETRT_CIFAR10)",
    }
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Decoded data sets are cached outside the repo; tests keep theirs out of the user's home unless
    # FORGETRT_CACHE_DIR is set (CI sets nothing, so CIFAR decodes once per session).
    os.environ.setdefault("FORGETRT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def digits():
    from forgetrt.train.data import load_data

    return load_data("digits")


@pytest.fixture(scope="session")
def digits_model_dir(tmp_path_factory: pytest.TempPathFactory, digits) -> Path:
    from forgetrt.train.workflows import train_model

    out = tmp_path_factory.mktemp("digits-model")
    train_model("digits-cnn", digits, out, device="cpu")
    return out


@pytest.fixture(scope="session")
def digits_bank(tmp_path_factory: pytest.TempPathFactory, digits, digits_model_dir: Path) -> tuple[Path, list[dict]]:
    """A bank with forget-0..forget-9 trained by the 'digits' preset, and the training results."""
    from forgetrt.train.recipes import PRESETS
    from forgetrt.train.workflows import train_class_vectors

    bank = tmp_path_factory.mktemp("digits-bank")
    results = train_class_vectors(digits_model_dir, digits, bank, recipe=PRESETS["digits"], device="cpu")
    return bank, results


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory, digits_model_dir, digits_bank) -> Path:
    """A bundle with forget-0..8 selectable, forget-9 mandatory at weight 0.5, two policies, range [-2, 2]."""
    from forgetrt.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("runtime-bundle") / "digits"
    export_onnx(
        digits_bank[0],
        out,
        model_dir=digits_model_dir,
        mandatory={"forget-9": 0.5},
        coeff_range=(-2.0, 2.0),
        policies={"eu": {"forget-3": 1.0}, "pair": {"forget-0": 1.0, "forget-3": 1.0}},
    )
    return out


class TorchReference:
    """Logits computed directly from the bank and the PyTorch model: classifier(x + c @ bank + mandatory)."""

    def __init__(self, bundle_dir: Path) -> None:
        import torch

        from forgetrt.runtime.bundle import Bundle

        self.torch = torch
        self.bundle = Bundle.load(bundle_dir)
        self.model = self.bundle.load_classifier("cpu")
        self.stacked, self.mandatory = self.bundle.vector_arrays()

    def __call__(self, images, coeffs, matrix=None):
        import numpy as np

        m = self.stacked if matrix is None else matrix
        x = images + (np.atleast_2d(coeffs) @ m).reshape(images.shape) + self.mandatory
        with self.torch.no_grad():
            return self.model(self.torch.from_numpy(x.astype(np.float32))).numpy()


@pytest.fixture(scope="session")
def torch_reference(digits_bundle):
    return TorchReference(digits_bundle)
