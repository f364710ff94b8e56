"""Classifier architectures (PyTorch): the registry shared by training and the runtime's torch backend.

Imported only where PyTorch is wanted (training, export, the torch backend); ``import forgetrt.runtime``
does not import this module. Every model starts with :class:`Normalize`, so its input contract is
[0, 1] pixels (the space forget vectors live in) and the normalization constants travel in the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import InvalidInputError, unknown
from .iospec import IOSpec

__all__ = ["Normalize", "register_model", "create_model", "list_models", "model_input_shape", "ResNet18Cifar"]


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
