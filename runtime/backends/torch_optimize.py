"""Inference rewrites of a bundle's PyTorch classifier for the torch backend (imported with torch only).

A trained classifier is ``Sequential(Normalize, body)`` (see :mod:`forgetrt.runtime.architectures`). At batch 1
on a GPU every kernel costs a few microseconds however small it is, so the rewrites cut the kernel count:

``bn``
    BatchNorm folded into the preceding convolution or linear layer (``torch.fx``), and Normalize folded
    away: the per-channel 1/std goes into the first convolution's weights (exact with zero padding,
    since 0/std = 0) and the mean becomes a constant image the caller adds in its prefix, together with
    the forget vectors, in one GEMM.
``cudnn`` (CUDA)
    ``bn`` plus each ``conv -> relu`` replaced by cuDNN's fused ``cudnn_convolution_relu`` and each
    ``relu(conv(x) + z)`` (a residual join) by ``cudnn_convolution_add_relu``; the bias of a shortcut
    convolution that only feeds the join moves into the fused op's bias. ResNet-18 (CIFAR) goes from
    about 70 kernels to about 25.

:func:`optimize_classifier` returns the rewritten module and the constant image: for every input ``x``,
``module(x + offset) == classifier(x)`` up to float rounding. The ``impl`` argument picks the fused ops'
implementation: ``"cudnn"`` (the real fused kernels, CUDA only) or ``"reference"`` (the same arithmetic in
plain ops, any device), so that the graph rewrite itself is testable without a GPU.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ..architectures import Normalize
from ..errors import unknown

__all__ = ["OptimizedClassifier", "optimize_classifier"]

_RELU_FUNCS = {torch.relu, F.relu, torch.nn.functional.relu}
_ADD_FUNCS = {operator.add, torch.add}


@dataclass
class OptimizedClassifier:
    module: nn.Module
    offset: torch.Tensor | None  # [C, H, W] constant image to add to the input, or None
    mode: str  # "none" | "bn" | "cudnn"
    fused: dict  # counts of what was rewritten


def _conv_args(conv: nn.Conv2d) -> tuple:
    return list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups


def _fusable(conv: nn.Module) -> bool:
    return type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


class ConvReLU(nn.Module):
    """relu(conv(x)) as one cuDNN kernel (``impl="cudnn"``) or as the plain ops (``"reference"``)."""

    def __init__(self, conv: nn.Conv2d, impl: str) -> None:
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding, self.dilation, self.groups = _conv_args(conv)
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "cudnn":
            return torch.cudnn_convolution_relu(
                x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
            )
        return torch.relu(F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups))


class ConvAddReLU(nn.Module):
    """relu(conv(x) + z) as one cuDNN kernel or as the plain ops; ``bias`` may include a moved shortcut bias."""

    def __init__(self, conv: nn.Conv2d, bias: torch.Tensor | None, impl: str) -> None:
        super().__init__()
        self.weight = conv.weight
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.stride, self.padding, self.dilation, self.groups = _conv_args(conv)
        self.impl = impl

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.impl == "cudnn":
            return torch.cudnn_convolution_add_relu(
                x, self.weight, z, 1.0, self.bias, self.stride, self.padding, self.dilation, self.groups
            )
        return torch.relu(
            F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups) + z
        )


def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_function" and node.target in _RELU_FUNCS:
        return True
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return True
    return node.op == "call_module" and type(modules.get(node.target)) is nn.ReLU


def _conv_node(node, modules: dict) -> nn.Conv2d | None:
    if (
        isinstance(node, fx.Node)
        and node.op == "call_module"
        and _fusable(modules.get(node.target))
        and len(node.users) == 1
    ):
        return modules[node.target]
    return None


def _fuse_relu(gm: fx.GraphModule, impl: str) -> dict:
    """Rewrite conv->relu and relu(conv + z) into fused modules, in place; returns counts."""
    modules = dict(gm.named_modules())
    counts = {"conv_relu": 0, "conv_add_relu": 0, "shortcut_bias_moved": 0}
    graph = gm.graph
    for node in list(graph.nodes):
        if not _is_relu(node, modules) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        src = node.args[0]
        conv = _conv_node(src, modules)
        if conv is not None:  # relu(conv(x))
            name = f"{src.target.replace('.', '_')}_relu"
            gm.add_submodule(name, ConvReLU(conv, impl))
            with graph.inserting_after(node):
                new = graph.call_module(name, (src.args[0],))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            graph.erase_node(src)
            counts["conv_relu"] += 1
            continue
        is_add = src.op == "call_function" and src.target in _ADD_FUNCS and len(src.args) == 2 and not src.kwargs
        if not is_add or len(src.users) != 1:
            continue
        a, b = src.args
        main_conv, main, z = None, None, None
        for cand, other in ((a, b), (b, a)):
            if isinstance(other, fx.Node) and (c := _conv_node(cand, modules)) is not None:
                main_conv, main, z = c, cand, other
                break
        if main_conv is None:
            continue
        bias = main_conv.bias.detach() if main_conv.bias is not None else None
        z_conv = _conv_node(z, modules)
        if (
            z_conv is not None and z_conv.bias is not None
        ):  # the join adds the shortcut's bias: do it once, in the fused op
            zb = z_conv.bias.detach()
            bias = zb.clone() if bias is None else bias + zb
            z_conv.bias = None
            counts["shortcut_bias_moved"] += 1
        name = f"{main.target.replace('.', '_')}_add_relu"
        gm.add_submodule(name, ConvAddReLU(main_conv, bias, impl))
        with graph.inserting_after(node):
            new = graph.call_module(name, (main.args[0], z))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        graph.erase_node(src)
        graph.erase_node(main)
        counts["conv_add_relu"] += 1
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return counts


_BN_AFTER = (
    (nn.Conv1d, nn.BatchNorm1d),
    (nn.Conv2d, nn.BatchNorm2d),
    (nn.Conv3d, nn.BatchNorm3d),
    (nn.Linear, nn.BatchNorm1d),
)


def _fold_bn(body: nn.Module) -> tuple[fx.GraphModule, int]:
    """A traced copy of ``body`` with every BatchNorm that directly follows a conv/linear layer (its only
    user) folded into that layer's weights and bias (eval statistics)."""
    gm = fx.symbolic_trace(copy.deepcopy(body))
    modules = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1 or not bn.track_running_stats:
            continue
        layer = modules[src.target]
        if not any(type(layer) is lt and type(bn) is bt for lt, bt in _BN_AFTER):
            continue
        fused = fuse_linear_bn_eval(layer, bn) if isinstance(layer, nn.Linear) else fuse_conv_bn_eval(layer, bn)
        parent, _, attr = src.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, fused)
        modules[src.target] = fused
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, folded


def _fold_input_scale(gm: fx.GraphModule, inv_std: torch.Tensor) -> bool:
    """Scale the first convolution's input channels by 1/std if the input feeds only that convolution."""
    modules = dict(gm.named_modules())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1 or len(placeholders[0].users) != 1:
        return False
    user = next(iter(placeholders[0].users))
    conv = modules.get(user.target) if user.op == "call_module" else None
    if not _fusable(conv) or conv.groups != 1 or conv.weight.shape[1] != inv_std.numel():
        return False
    with torch.no_grad():
        conv.weight.mul_(inv_std.view(1, -1, 1, 1).to(conv.weight))
    return True


def optimize_classifier(model: nn.Module, mode: str, impl: str = "reference") -> OptimizedClassifier:
    """Rewrite ``model`` (eval mode, not modified) for inference; see the module docstring for ``mode``.

    ``mode="cudnn"`` with ``impl="reference"`` performs the same rewrite with the fused ops written as
    plain ops (any device); ``impl="cudnn"`` calls cuDNN's fused kernels (CUDA tensors only).
    """
    if mode not in ("none", "bn", "cudnn"):
        raise unknown("fuse mode", mode, ("none", "bn", "cudnn"))
    if impl not in ("reference", "cudnn"):
        raise unknown("fused-op implementation", impl, ("reference", "cudnn"))
    if mode == "none":
        return OptimizedClassifier(model, None, "none", {})
    was_training = model.training
    model.eval()
    norm, body = None, model
    if isinstance(model, nn.Sequential) and len(model) == 2 and isinstance(model[0], Normalize):
        norm, body = model[0], model[1]
    gm, folded = _fold_bn(body)  # a copy: the model is not modified
    counts = {"bn_folded": folded}
    offset = None
    if norm is not None:
        if _fold_input_scale(gm, 1.0 / norm.std.detach().flatten()):
            offset = -norm.mean.detach().view(-1, 1, 1)  # broadcast by the caller to [C, H, W]
            counts["normalize_folded"] = 1
            module: nn.Module = gm
        else:
            module = nn.Sequential(copy.deepcopy(norm), gm)
    else:
        module = gm
    if mode == "cudnn":
        counts.update(_fuse_relu(gm, impl))
    for p in module.parameters():
        p.requires_grad_(False)
    model.train(was_training)
    return OptimizedClassifier(module.eval(), offset, mode, counts)
