"""Matchers for graphs of ATen ops (the ``export`` frontend).

::

    aten.linear(x, w, b)                      -> Site("linear")
    aten.addmm(b, x, w)   (GPT-2 Conv1D: w is in x out)  -> Site("addmm")
    aten.matmul / aten.bmm / aten.mm(a, b)    -> Site("matmul")
    aten.convolution(x, w, b, s, p, d, False, _, g) / aten.conv{1,2,3}d(...)  -> Site("conv")

Names come from ``nn_module_stack``: a product that is the whole of an ``nn.Linear`` /
``nn.ConvNd`` / ``Conv1D`` module is named by the module path (``bert.encoder.layer.0.output.dense``)
as symbolic tracing names it, so overrides by module name and the report read the same under
every frontend; any other product is ``<module path>.<node name>``.
``scaled_dot_product_attention`` is not matched: its two products run inside one fused kernel
that sampling would have to take apart, and at the sequence lengths of these models the
projections around it hold most of the FLOPs (see docs/guide.md, Limits).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

aten = torch.ops.aten

# Module classes whose forward is a single product: the product takes the module's name.
_PRODUCT_MODULES = (
    "Linear",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Conv1D",
    "LazyLinear",
    "NonDynamicallyQuantizableLinear",
)

LINEARS = {aten.linear.default: "aten.linear"}
ADDMMS = {aten.addmm.default: "aten.addmm"}
MATMULS = {
    aten.matmul.default: "aten.matmul",
    aten.bmm.default: "aten.bmm",
    aten.mm.default: "aten.mm",
}
CONVS: dict[Any, str] = {
    aten.conv1d.default: "aten.conv1d",
    aten.conv2d.default: "aten.conv2d",
    aten.conv3d.default: "aten.conv3d",
    aten.conv1d.padding: "aten.conv1d",
    aten.conv2d.padding: "aten.conv2d",
    aten.conv3d.padding: "aten.conv3d",
}
CONVOLUTION = aten.convolution.default


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


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if i < len(node.args):
        return node.args[i]
    return node.kwargs.get(name, default)


def aten_site(node: fx.Node, make: Callable[..., Any]) -> Any:
    """The Site of an ATen product node, or ``None``.

    ``make`` is ``Site`` (passed in to keep this module free of an import cycle).
    """
    target = node.target
    if target in LINEARS:
        name, owner = product_name(node)
        x, w, b = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
        return make("linear", "Linear" if name == owner else LINEARS[target], name, owner, (x, w, b))
    if target in ADDMMS:
        name, owner = product_name(node)
        bias, a, b = _arg(node, 0, "self"), _arg(node, 1, "mat1"), _arg(node, 2, "mat2")
        beta, alpha = _arg(node, 3, "beta", 1), _arg(node, 4, "alpha", 1)
        why = None if (beta, alpha) == (1, 1) else "addmm with beta/alpha other than 1 is left exact"
        op = module_path(node)[1] if name == owner else ADDMMS[target]
        return make("addmm", op, name, owner, (bias, a, b), unsupported=why)
    if target in MATMULS:
        name, owner = product_name(node)
        return make("matmul", MATMULS[target], name, owner, (_arg(node, 0, "self"), _arg(node, 1, "other")))
    if target in CONVS or target is CONVOLUTION:
        name, owner = product_name(node)
        x, w, b = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
        stride, padding, dilation = (
            _arg(node, 3, "stride", 1),
            _arg(node, 4, "padding", 0),
            _arg(node, 5, "dilation", 1),
        )
        if target is CONVOLUTION:
            groups = _arg(node, 8, "groups", 1)
            why = "transposed convolution is left exact" if _arg(node, 6, "transposed", False) else None
        else:
            groups, why = _arg(node, 6, "groups", 1), None
        if why is None and groups != 1:
            why = f"grouped convolution (groups={groups}) is left exact"
        op = module_path(node)[1] if name == owner else CONVS.get(target, "aten.convolution")
        return make("conv", op, name, owner, (x, w, b), (stride, padding, dilation), groups, why)
    return None
