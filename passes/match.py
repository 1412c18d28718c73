"""Recognise the matmul / linear / conv nodes of an fx graph and say which can be sampled.

``match(gm, node)`` returns a :class:`Site` for every node that multiplies over an inner
dimension (``nn.Linear``, ``F.linear``, ``matmul``/``@``/``bmm``/``mm``, ``addmm``,
``nn.ConvNd``, ``F.convNd``), or ``None``. A Site that cannot be sampled still comes back,
with ``unsupported`` set to the reason, so its FLOPs count and the report can show why.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from approxcompile.passes.match_aten import aten_site, product_name
from torch import nn

from approxcompile import ops

_MATMULS = {torch.matmul: "matmul", operator.matmul: "matmul", torch.bmm: "bmm", torch.mm: "mm"}
_CONV_FUNCS = {F.conv1d: "F.conv1d", F.conv2d: "F.conv2d", F.conv3d: "F.conv3d"}
_CONV_DEFAULTS = (None, 1, 0, 1, 1)  # bias, stride, padding, dilation, groups


@dataclass(frozen=True)
class Site:
    """How one node multiplies: enough to cost it and to emit the sampled call.

    ``operands`` are fx arguments (nodes, or parameter qualnames for module calls);
    ``conv`` holds ``(stride, padding, dilation)`` for convolutions.
    """

    kind: str  # "linear" | "matmul" | "addmm" | "conv"
    op: str  # display name
    name: str  # qualified node name used for overrides and the report
    owner: str  # path of the module that holds the node ("" for the top level)
    operands: tuple[Any, ...]  # linear/conv: (x, weight, bias); matmul: (a, b); addmm: (bias, a, b)
    conv: tuple[Any, Any, Any] | None = None
    groups: int = 1
    unsupported: str | None = None

    @property
    def config_kind(self) -> str:
        """The op type overrides are keyed by (``addmm`` counts as ``linear``)."""
        return "linear" if self.kind == "addmm" else self.kind


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def _qualified(node: fx.Node) -> str:
    owner = _owner(node)
    return f"{owner}.{node.name}" if owner else node.name


def _args(node: fx.Node, names: tuple[str, ...], defaults: tuple[Any, ...]) -> list[Any]:
    """Positional + keyword arguments of a call, in ``names`` order; trailing ones defaulted."""
    first_default = len(names) - len(defaults)
    out: list[Any] = []
    for i, name in enumerate(names):
        if i < len(node.args):
            out.append(node.args[i])
        elif name in node.kwargs:
            out.append(node.kwargs[name])
        else:
            out.append(defaults[i - first_default] if i >= first_default else None)
    return out


def _module_site(gm: fx.GraphModule, node: fx.Node) -> Site | None:
    mod = gm.get_submodule(str(node.target))
    name = str(node.target)
    x = node.args[0] if node.args else node.kwargs.get("input")
    params = (f"{name}.weight", f"{name}.bias" if getattr(mod, "bias", None) is not None else None)
    if type(mod) is nn.Linear:
        return Site("linear", "Linear", name, name, (x, *params))
    if type(mod) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        conv = (mod.stride, mod.padding, mod.dilation)
        why = None
        if mod.groups != 1:
            why = f"grouped convolution (groups={mod.groups}) is left exact"
        elif mod.padding_mode != "zeros":
            why = f"padding_mode={mod.padding_mode!r} is not sampled"
        return Site("conv", type(mod).__name__, name, name, (x, *params), conv, mod.groups, why)  # type: ignore[arg-type]
    return None


def match(gm: fx.GraphModule, node: fx.Node) -> Site | None:
    """The :class:`Site` of ``node`` if it is a matmul / linear / conv, else ``None``."""
    if node.op == "call_module":
        return _module_site(gm, node)
    if node.op != "call_function" or node.target in ops.SAMPLED_OPS:
        return None
    name, owner = _qualified(node), _owner(node)
    if node.target is F.linear:
        x, w, b = _args(node, ("input", "weight", "bias"), (None,))
        name, owner = product_name(node)  # dynamo graphs: nn.Linear's own call takes its name
        return Site("linear", "Linear" if name == owner else "F.linear", name, owner, (x, w, b))
    if node.target in _MATMULS:
        second = "other" if _MATMULS[node.target] == "matmul" else "mat2"
        a, b = _args(node, ("input", second), ())
        return Site("matmul", _MATMULS[node.target], name, owner, (a, b))
    if node.target is torch.addmm:
        bias, a, b, beta, alpha = _args(node, ("input", "mat1", "mat2", "beta", "alpha"), (1, 1))
        why = None if (beta, alpha) == (1, 1) else "addmm with beta/alpha other than 1 is left exact"
        return Site("addmm", "addmm", name, owner, (bias, a, b), unsupported=why)
    if node.target in _CONV_FUNCS:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        x, w, b, stride, padding, dilation, groups = _args(node, names, _CONV_DEFAULTS)
        why = None if groups == 1 else f"grouped convolution (groups={groups}) is left exact"
        op = _CONV_FUNCS[node.target]
        return Site("conv", op, name, owner, (x, w, b), (stride, padding, dilation), groups, why)
    return aten_site(node, Site)
