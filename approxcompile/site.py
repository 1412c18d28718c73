"""What a matcher finds in a graph: the :class:`Site` of one product node, and call-argument helpers.

A matcher of :mod:`approxcompile.kinds` turns an fx node into a ``Site``; the cost pass stores
it in the node's plan (``NodePlan.site``), and the later passes read it from there instead of
matching again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx


@dataclass(frozen=True)
class Site:
    """How one node multiplies: enough to cost it and to emit the sampled call.

    ``operands`` are fx arguments (nodes, or parameter qualnames for module calls), in the
    order the kind's sampled op takes them; ``conv`` holds ``(stride, padding, dilation)``
    for convolutions. ``unsupported`` says why a matched node cannot be sampled (its FLOPs
    still count, and the report shows the reason).
    """

    kind: str  # a key of approxcompile.kinds.KINDS
    op: str  # display name: what the user wrote ("Linear", "F.linear", "bmm", ...)
    name: str  # qualified node name used for overrides and the report
    owner: str  # path of the module that holds the node ("" for the top level)
    operands: tuple[Any, ...]  # linear/conv: (x, weight, bias); matmul: (a, b); addmm: (bias, a, b)
    conv: tuple[Any, Any, Any] | None = None
    groups: int = 1
    unsupported: str | None = None


def owner(node: fx.Node) -> str:
    """Path of the module whose ``forward`` holds ``node`` ("" for the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def qualified(node: fx.Node) -> str:
    """``<owner>.<node name>``, the name overrides match against."""
    where = owner(node)
    return f"{where}.{node.name}" if where else node.name


def call_args(node: fx.Node, names: tuple[str, ...], defaults: tuple[Any, ...]) -> list[Any]:
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
