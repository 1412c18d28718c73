"""Matchers for graphs of ATen ops (the ``export`` frontend), as entries of the op-kind registry.

::

    aten.linear(x, w, b)                                -> Site("linear")
    aten.addmm(b, x, w)  (GPT-2's Conv1D: w is in x out) -> Site("addmm")
    aten.matmul / aten.bmm / aten.mm(a, b)               -> Site("matmul")
    aten.convolution(x, w, b, s, p, d, False, _, g) / aten.conv{1,2,3}d(...) -> Site("conv")

Names come from ``nn_module_stack``: a product that is the whole of an ``nn.Linear`` /
``nn.ConvNd`` / ``Conv1D`` module is named by the module path (``bert.encoder.layer.0.output.dense``)
as symbolic tracing names it, so overrides by module name and the report read the same under
every frontend; any other product is ``<module path>.<node name>``.
``aten.scaled_dot_product_attention`` is matched (``approxcompile.kinds``, kind ``attention``) but
stays exact unless ``ApproxConfig(attention="decomposed")``: its two products run inside one
fused kernel that sampling has to take apart (see docs/guide.md, Limits).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from approxcompile.site import Site

aten = torch.ops.aten

# Module classes whose forward is a single product: the product takes the module's name.
_PRODUCT_MODULES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "NonDynamicallyQuantizableLinear")

LINEARS = {aten.linear.default: "aten.linear"}
ADDMMS = {aten.addmm.default: "aten.addmm"}
MATMULS = {aten.matmul.default: "aten.matmul", aten.bmm.default: "aten.bmm", aten.mm.default: "aten.mm"}
ATTENTIONS = {aten.scaled_dot_product_attention.default: "aten.scaled_dot_product_attention"}
CONVS: dict[Any, str] = {
    aten.conv1d.default: "aten.conv1d",
    aten.conv2d.default: "aten.conv2d",
    aten.conv3d.default: "aten.conv3d",
    aten.conv1d.padding: "aten.conv1d",
    aten.conv2d.padding: "aten.conv2d",
    aten.conv3d.padding: "aten.conv3d",
    aten.convolution.default: "aten.convolution",
}


def module_path(node: fx.Node) -> tuple[str, str]:
    """(path, class name) of the innermost module the node ran in; ``("", "")`` at the top level."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = next(reversed(stack.values()))
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return str(path), cls_name.rsplit(".", 1)[-1]


def product_name(node: fx.Node) -> tuple[str, str]:
    """(name, owner): the module path for a product that is its module's whole forward."""
    path, cls = module_path(node)
    if path and cls in _PRODUCT_MODULES:
        return path, path
    return (f"{path}.{node.name}" if path else node.name), path


def _display(node: fx.Node, name: str, owner: str, display: str) -> str:
    """The module's class ("Linear", "Conv1D") for a module-named product, else the ATen op."""
    return module_path(node)[1] if name == owner else display


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if i < len(node.args) else node.kwargs.get(name, default)


def aten_linear(gm: fx.GraphModule, node: fx.Node, display: str) -> Site:
    name, owner = product_name(node)
    x, w, b = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
    return Site("linear", _display(node, name, owner, display), name, owner, (x, w, b))


def aten_addmm(gm: fx.GraphModule, node: fx.Node, display: str) -> Site:
    name, owner = product_name(node)
    bias, a, b = _arg(node, 0, "self"), _arg(node, 1, "mat1"), _arg(node, 2, "mat2")
    beta, alpha = _arg(node, 3, "beta", 1), _arg(node, 4, "alpha", 1)
    why = None if (beta, alpha) == (1, 1) else "addmm with beta/alpha other than 1 is left exact"
    return Site("addmm", _display(node, name, owner, display), name, owner, (bias, a, b), unsupported=why)


def aten_matmul(gm: fx.GraphModule, node: fx.Node, display: str) -> Site:
    name, owner = product_name(node)
    return Site("matmul", display, name, owner, (_arg(node, 0, "self"), _arg(node, 1, "other")))


def aten_conv(gm: fx.GraphModule, node: fx.Node, display: str) -> Site:
    name, owner = product_name(node)
    x, w, b = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
    conv = (_arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0), _arg(node, 5, "dilation", 1))
    if node.target is aten.convolution.default:
        groups = _arg(node, 8, "groups", 1)
        why = "transposed convolution is left exact" if _arg(node, 6, "transposed", False) else None
    else:
        groups, why = _arg(node, 6, "groups", 1), None
    if why is None and groups != 1:
        why = f"grouped convolution (groups={groups}) is left exact"
    display = _display(node, name, owner, display)
    return Site("conv", display, name, owner, (x, w, b), conv, groups, why)
