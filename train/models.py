"""Classifier registry and the model folder format.

Every model starts with a :class:`Normalize` layer, so its input contract is [0, 1] pixels (the space
forget vectors live in) and the normalization constants travel inside the weights.

A model folder holds ``model.safetensors`` (the state dict) and ``model.json`` (arch, IOSpec, weights
fingerprint, accuracies, training recipe). Example::

    model = create_model("digits-cnn", IOSpec(shape=(1, 8, 8), mean=(0.3,), std=(0.4,), labels=...))
    save_model("runs/model", model, arch="digits-cnn", iospec=spec)
    model, info = load_model("runs/model")
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from forgetrt.runtime.errors import ArtifactError, CorruptArtifactError, InvalidInputError, unknown
from forgetrt.runtime.files import atomic_write, atomic_write_json, read_json, weights_fingerprint
from forgetrt.runtime.iospec import IOSpec

__all__ = [
    "Normalize",
    "ModelInfo",
    "register_model",
    "create_model",
    "list_models",
    "model_input_shape",
    "save_model",
    "load_model",
    "model_fingerprint",
    "MODEL_FILE",
    "MODEL_JSON",
]

MODEL_FILE = "model.safetensors"
MODEL_JSON = "model.json"
MODEL_SCHEMA_VERSION = 1


class Normalize(nn.Module):
    """(x - mean) / std per channel, with the constants as buffers (saved with the weights)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@dataclass(frozen=True)
class _Arch:
    name: str
    input_shape: tuple[int, int, int]
    build: Callable[[int], nn.Module]  # num_classes -> body (after Normalize)
    description: str


_ARCHS: dict[str, _Arch] = {}


def register_model(name: str, input_shape: tuple[int, int, int], description: str) -> Callable:
    """Decorator: register ``fn(num_classes) -> nn.Module`` (the body behind Normalize) under ``name``."""

    def deco(fn: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
        if name in _ARCHS:
            raise ValueError(f"model {name!r} registered twice")
        _ARCHS[name] = _Arch(name, input_shape, fn, description)
        return fn

    return deco


def list_models() -> dict[str, str]:
    return {n: a.description for n, a in _ARCHS.items()}


def model_input_shape(arch: str) -> tuple[int, int, int]:
    if arch not in _ARCHS:
        raise unknown("arch", arch, _ARCHS)
    return _ARCHS[arch].input_shape


def create_model(arch: str, iospec: IOSpec) -> nn.Sequential:
    """Build ``Normalize -> body`` for a registered architecture, checked against the IOSpec."""
    shape = model_input_shape(arch)
    if tuple(iospec.shape) != shape:
        raise InvalidInputError(f"arch {arch!r} takes input {shape}, the data has {tuple(iospec.shape)}")
    body = _ARCHS[arch].build(iospec.num_classes)
    return nn.Sequential(Normalize(iospec.mean, iospec.std), body)


# --------------------------------------------------------------------------- architectures


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@register_model("digits-cnn", (1, 8, 8), "small CNN for sklearn's 1×8×8 digits (~24k params)")
def _digits_cnn(num_classes: int) -> nn.Module:
    return nn.Sequential(
        *_conv_bn(1, 16),
        *_conv_bn(16, 32),
        nn.MaxPool2d(2),
        *_conv_bn(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


@register_model("cifar-small", (3, 32, 32), "fast small CIFAR CNN for CPU-sized experiments (~100k params, ~15M MACs)")
def _cifar_small(num_classes: int) -> nn.Module:
    return nn.Sequential(
        *_conv_bn(3, 16),
        *_conv_bn(16, 32),
        nn.MaxPool2d(2),  # 16
        *_conv_bn(32, 64),
        nn.MaxPool2d(2),  # 8
        *_conv_bn(64, 128),
        nn.MaxPool2d(2),  # 4
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18Cifar(nn.Module):
    """The paper's ResNet-18 for 32×32 inputs: 3×3 stride-1 stem, no max-pool, [2, 2, 2, 2] blocks."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, 64))
        layers: list[nn.Module] = []
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


@register_model("resnet18-cifar", (3, 32, 32), "ResNet-18 for CIFAR (3×3 stride-1 stem, no max-pool; 11M params)")
def _resnet18_cifar(num_classes: int) -> nn.Module:
    return ResNet18Cifar(num_classes)


# --------------------------------------------------------------------------- model folders


@dataclass(frozen=True)
class ModelInfo:
    """What model.json says about a model folder."""

    arch: str
    iospec: IOSpec
    fingerprint: str
    path: Path
    record: dict[str, Any]


def _state_numpy(model: nn.Module) -> dict[str, Any]:
    return {k: v.detach().cpu().contiguous().numpy() for k, v in model.state_dict().items()}


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the classifier's weights (see :func:`forgetrt.runtime.files.weights_fingerprint`)."""
    return weights_fingerprint(_state_numpy(model))


def save_model(
    path: str | os.PathLike, model: nn.Module, *, arch: str, iospec: IOSpec, **record: Any
) -> ModelInfo:
    """Write ``model.safetensors`` + ``model.json`` atomically; extra keyword fields go into the JSON."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fp = model_fingerprint(model)
    atomic_write(path / MODEL_FILE, lambda p: save_file(state, str(p), metadata={"format": "forgetrt.model", "arch": arch}))
    rec = {
        "schema_version": MODEL_SCHEMA_VERSION,
        "kind": "forgetrt.model",
        "arch": arch,
        "iospec": iospec.to_dict(),
        "fingerprint": fp,
        **record,
    }
    atomic_write_json(path / MODEL_JSON, rec)
    return ModelInfo(arch, iospec, fp, path, rec)


def read_model_info(path: str | os.PathLike) -> ModelInfo:
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"model folder not found: {path}")
    rec = read_json(path / MODEL_JSON, "model record")
    if not isinstance(rec, dict) or rec.get("kind") != "forgetrt.model":
        raise CorruptArtifactError(f"{path / MODEL_JSON} is not a ForgetRT model record")
    try:
        arch, fp = str(rec["arch"]), str(rec["fingerprint"])
    except KeyError as e:
        raise CorruptArtifactError(f"{path / MODEL_JSON} lacks field {e}") from e
    return ModelInfo(arch, IOSpec.from_dict(rec.get("iospec") or {}), fp, path, rec)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelInfo]:
    """Load a model folder in eval mode, verifying its weights against the recorded fingerprint."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    info = read_model_info(path)
    model = create_model(info.arch, info.iospec)
    wfile = info.path / MODEL_FILE
    if not wfile.is_file():
        raise ArtifactError(f"model weights not found: {wfile}")
    try:
        state = load_file(str(wfile))
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptArtifactError(f"cannot read {wfile}: {e}") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CorruptArtifactError(f"{wfile} does not fit arch {info.arch!r}: {str(e).splitlines()[0]}") from e
    fp = model_fingerprint(model)
    if fp != info.fingerprint:
        raise CorruptArtifactError(
            f"{wfile} has weights fingerprint {fp[:16]}…, {MODEL_JSON} records {info.fingerprint[:16]}…"
        )
    model.eval()
    return model.to(device), info
