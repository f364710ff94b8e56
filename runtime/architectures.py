"""Classifier architectures (PyTorch): the registry shared by training and the runtime's torch backend.

Imported only where PyTorch is wanted (training, export, the torch backend); ``import forgetrt.runtime``
does not import this module. Every model starts with :class:`Normalize`, so its input contract is
[0, 1] pixels (the space forget vectors live in) and the normalization constants travel in the weights.

Besides the project's own architectures, ``torchvision:NAME`` and ``timm:NAME`` name any classifier of
those libraries (built without pretrained weights: weights come from a local file, see
``forgetrt import-model``). They take any input size; the IOSpec the user declares fixes it.
"""

from __future__ import annotations

import difflib
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import InvalidInputError, unknown
from .iospec import IOSpec

__all__ = [
    "Normalize",
    "register_model",
    "create_model",
    "create_body",
    "list_models",
    "model_input_shape",
    "is_external",
    "EXTERNAL_LIBRARIES",
    "TORCH_EXPORT",
    "ExportedProgramModule",
    "program_model",
    "ResNet18Cifar",
]

#: the architecture name of a classifier brought as a ``torch.export`` program (``model.pt2``)
TORCH_EXPORT = "torch.export"

#: libraries whose classifiers ``LIB:NAME`` architectures build
EXTERNAL_LIBRARIES = ("torchvision", "timm")
_EXTERNAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


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
    out = {n: a.description for n, a in _ARCHS.items()}
    out["torchvision:NAME"] = "any torchvision classifier (torchvision.models.list_models()), any input size"
    out["timm:NAME"] = "any timm classifier (timm.list_models()), any input size"
    return out


def is_external(arch: str) -> bool:
    """Whether ``arch`` names a torchvision or timm classifier (``LIB:NAME``)."""
    return ":" in arch and arch.partition(":")[0] in EXTERNAL_LIBRARIES


def model_input_shape(arch: str) -> tuple[int, int, int] | None:
    """The input an architecture takes, or None for a torchvision/timm one or a torch.export program (the
    IOSpec fixes it)."""
    if arch == TORCH_EXPORT:
        return None
    if is_external(arch):
        _split_external(arch)
        return None
    if arch not in _ARCHS:
        raise unknown("arch", arch, [*_ARCHS, "torchvision:NAME", "timm:NAME"])
    return _ARCHS[arch].input_shape


def _split_external(arch: str) -> tuple[str, str]:
    lib, _, name = arch.partition(":")
    if not _EXTERNAL_NAME.match(name):  # no hub prefixes, paths or URLs: a registry name only
        raise InvalidInputError(f"arch {arch!r}: want {lib}:NAME with NAME a model name of {lib}'s registry")
    return lib, name


def _external_body(arch: str, num_classes: int, input_hw: tuple[int, int] | None = None) -> nn.Module:
    """Build a torchvision/timm classifier by registry name, randomly initialized (never downloads).
    torchvision: its classification models only (detection, segmentation, video and optical-flow models
    are other tasks, and some would fetch backbone weights); GoogLeNet and Inception v3 without their
    auxiliary heads (which change what the model returns while training). timm: models that take an
    image size are built for ``input_hw``."""
    lib, name = _split_external(arch)
    if lib == "torchvision":
        try:
            import torchvision  # ModuleNotFoundError names the package; the CLI maps it to the 'vision' extra
        except (RuntimeError, OSError, ImportError) as e:
            if isinstance(e, ModuleNotFoundError) and e.name == "torchvision":
                raise
            raise InvalidInputError(
                f"torchvision is installed but does not load beside torch {torch.__version__} ({e}): install the "
                "torchvision release built for this torch (e.g. torch 2.14.1 with torchvision 0.29.1)"
            ) from e

        names = list(torchvision.models.list_models(module=torchvision.models))  # classification models
        if name not in names:
            other = name in torchvision.models.list_models()
            raise unknown(
                "torchvision classification model" if other else "torchvision model",
                name,
                difflib.get_close_matches(name, names, 8) or names[:20],
            )
        extra = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **extra)
    try:
        import timm
    except (RuntimeError, OSError, ImportError) as e:
        if isinstance(e, ModuleNotFoundError) and e.name in ("timm", "torchvision"):
            raise
        raise InvalidInputError(
            f"timm is installed but does not load beside torch {torch.__version__} ({e}): install the torchvision "
            "release built for this torch"
        ) from e

    names = list(timm.list_models())
    if name not in names:
        raise unknown("timm model", name, difflib.get_close_matches(name, names, 8) or names[:20])
    if input_hw is not None:
        try:  # vision transformers and others built for one input size
            return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=input_hw)
        except TypeError:  # a model without that argument takes any size
            pass
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


_QUIET_LOCK = threading.Lock()


class ExportedProgramModule(nn.Module):
    """A ``torch.export`` program's module as a classifier body. Such a module refuses ``train()``/``eval()``
    (its graph is fixed: exported in eval mode, batch norm uses its running statistics), so mode changes
    stop here instead of reaching it; gradients flow through it as through any module."""

    def __init__(self, program_module: nn.Module) -> None:
        super().__init__()
        self.program = program_module

    def train(self, mode: bool = True) -> ExportedProgramModule:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)


def program_model(program: bytes | str, iospec: IOSpec) -> nn.Sequential:
    """``Normalize -> program`` from a ``torch.export`` program (file path or bytes of a ``.pt2``)."""
    import io as _io
    import logging
    import warnings

    quiet = [logging.getLogger(n) for n in ("torch", "torch.export", "torch._export")]
    _QUIET_LOCK.acquire()  # loads in several threads must not leave torch's logging silenced
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:  # torch logs its own traceback for a file it cannot read: the error below says it
            lg.setLevel(logging.CRITICAL + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.load(_io.BytesIO(program) if isinstance(program, bytes) else program)
    except Exception as e:  # torch raises many kinds for a file that is not a program
        why = str(e).replace("Please check the warnings above for possible errors.", "").strip()[:300]
        raise InvalidInputError(f"not a torch.export program (.pt2): {type(e).__name__}: {why}") from e
    finally:
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)
        _QUIET_LOCK.release()
    return nn.Sequential(Normalize(iospec.mean, iospec.std), ExportedProgramModule(ep.module()))


def create_body(arch: str, num_classes: int, input_hw: tuple[int, int] | None = None) -> nn.Module:
    """The classifier behind :class:`Normalize` (what a torchvision/timm weights file holds)."""
    if arch == TORCH_EXPORT:
        raise InvalidInputError("a torch.export classifier is built from its program file, not by name")
    if is_external(arch):
        try:
            return _external_body(arch, num_classes, input_hw)
        except TypeError as e:  # a builder that takes no num_classes: not an image classifier
            raise InvalidInputError(f"{arch} is not an image classifier this runtime can build: {e}") from e
    model_input_shape(arch)
    return _ARCHS[arch].build(num_classes)


def create_model(arch: str, iospec: IOSpec) -> nn.Sequential:
    """Build ``Normalize -> body`` for an architecture, checked against the IOSpec."""
    shape = model_input_shape(arch)
    if shape is not None and tuple(iospec.shape) != shape:
        raise InvalidInputError(f"arch {arch!r} takes input {shape}, the data has {tuple(iospec.shape)}")
    body = create_body(arch, iospec.num_classes, tuple(iospec.shape[1:]))  # type: ignore[arg-type]
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
