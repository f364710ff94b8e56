"""The torch backend's inference rewrites (CPU): BatchNorm and Normalize folding and the conv+ReLU /
conv+add+ReLU fusion pass, checked against the module as trained. The fused ops run here as their
plain-op reference; the cuDNN kernels themselves are checked in test_gpu_runtime.py."""

import numpy as np
import pytest
import torch
from torch import nn

from forgetrt.runtime import BackendUnavailableError, InvalidInputError, Runtime, RuntimeConfig, UnknownNameError
from forgetrt.runtime.architectures import Normalize, create_model
from forgetrt.runtime.backends.torch_optimize import ConvAddReLU, ConvReLU, optimize_classifier
from forgetrt.runtime.iospec import IOSpec

ARCHS = {"resnet18-cifar": (3, 32, 32), "digits-cnn": (1, 8, 8), "cifar-small": (3, 32, 32)}


def _model(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    shape = ARCHS[arch]
    c = shape[0]
    spec = IOSpec(
        shape=shape, mean=(0.45,) * c, std=tuple(0.2 + 0.05 * i for i in range(c)), labels=tuple("abcdefghij")
    )
    m = create_model(arch, spec).eval()
    for mod in m.modules():  # non-trivial statistics, so a wrong fold shows
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.3, 0.3)
    return m


def _run(opt, x):
    with torch.no_grad():
        return opt.module(x + (opt.offset if opt.offset is not None else 0))


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("mode", ["bn", "cudnn"])
def test_rewrite_matches_the_module_as_trained(arch, mode):
    m = _model(arch)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.rand(5, *ARCHS[arch])
    with torch.no_grad():
        want = m(x)
    opt = optimize_classifier(m, mode)
    got = _run(opt, x)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items()), "the model itself was modified"
    mods = list(opt.module.modules())
    assert not any(isinstance(x, (nn.BatchNorm2d, Normalize)) for x in mods)
    assert opt.fused["normalize_folded"] == 1 and opt.offset is not None
    n_bn = sum(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    assert opt.fused["bn_folded"] == n_bn
    if mode == "cudnn":
        convs = sum(isinstance(x, nn.Conv2d) for x in m.modules())
        relu_fused = sum(isinstance(x, ConvReLU) for x in mods)
        add_fused = sum(isinstance(x, ConvAddReLU) for x in mods)
        assert (relu_fused, add_fused) == (opt.fused["conv_relu"], opt.fused["conv_add_relu"])
        if arch == "resnet18-cifar":  # stem + 8 first convs of blocks; 8 residual joins; 3 shortcut biases moved
            assert (relu_fused, add_fused, opt.fused["shortcut_bias_moved"]) == (9, 8, 3)
            left = [x for x in mods if isinstance(x, nn.Conv2d)]
            assert len(left) == 3 and all(c.bias is None for c in left)  # the shortcut convolutions
        else:
            assert relu_fused == convs and add_fused == 0


def test_normalize_stays_when_the_first_layer_is_not_a_convolution():
    m = nn.Sequential(
        Normalize((0.5,), (0.25,)),
        nn.Sequential(
            nn.MaxPool2d(2), nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
        ),
    ).eval()
    m[1][2].running_mean.uniform_(-1, 1)
    opt = optimize_classifier(m, "cudnn")
    assert opt.offset is None and "normalize_folded" not in opt.fused
    assert isinstance(opt.module[0], Normalize) and opt.fused["conv_relu"] == 1
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(_run(opt, x), m(x), atol=1e-6)
    opt.module.to(torch.float64)
    assert m[0].mean.dtype == torch.float32  # the rewritten module owns its Normalize


def test_unknown_modes_are_refused():
    m = _model("digits-cnn")
    with pytest.raises(UnknownNameError, match="unknown fuse mode 'tensorrt'"):
        optimize_classifier(m, "tensorrt")
    with pytest.raises(UnknownNameError, match="fused-op implementation"):
        optimize_classifier(m, "cudnn", impl="triton")
    assert optimize_classifier(m, "none").module is m


def test_backend_fuse_modes_agree(digits_bundle, torch_reference):
    rng = np.random.default_rng(0)
    x = rng.random((6, 1, 8, 8), dtype=np.float32)
    c = rng.uniform(-1, 1, (6, 9)).astype(np.float32)
    want = torch_reference(x, c)  # the module as trained, with forget-9 mandatory at 0.5
    for fuse, used in (("auto", "bn"), ("bn", "bn"), ("none", "none")):
        with Runtime.load(digits_bundle, RuntimeConfig(backend="torch", device="cpu"), {"fuse": fuse}) as r:
            d = r.describe()["backend"]
            assert (d["fuse_requested"], d["fuse"]) == (fuse, used)
            np.testing.assert_allclose(r.infer(x, coeffs=c).logits, want, atol=1e-5 * max(1.0, np.abs(want).max()))
    with pytest.raises(BackendUnavailableError, match="fuse 'cudnn' needs CUDA"):
        Runtime.load(digits_bundle, RuntimeConfig(backend="torch", device="cpu"), {"fuse": "cudnn"})
    with pytest.raises(UnknownNameError, match="unknown fuse mode 'all'"):
        Runtime.load(digits_bundle, RuntimeConfig(backend="torch", device="cpu"), {"fuse": "all"})
    with pytest.raises(
        InvalidInputError, match="backend 'onnxruntime' takes no option 'fuse' \\(its options: threads\\)"
    ):
        Runtime.load(digits_bundle, RuntimeConfig(backend="onnxruntime", device="cpu"), {"fuse": "bn"})


def test_folded_module_in_bf16(digits_bundle, torch_reference):
    rng = np.random.default_rng(1)
    x = rng.random((4, 1, 8, 8), dtype=np.float32)
    want = torch_reference(x, np.zeros((4, 9), np.float32))
    with Runtime.load(
        digits_bundle, RuntimeConfig(backend="torch", device="cpu"), {"precision": "bf16", "fuse": "bn"}
    ) as r:
        assert next(r.backends[0].module.parameters()).dtype == torch.bfloat16  # cast as a whole, no autocast
        got = r.infer(x).logits
    assert got.dtype == np.float32
    err = float(np.abs(got - want).max())
    assert 0 < err <= 2e-2 * max(1.0, np.abs(want).max())
