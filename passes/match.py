"""Recognise the matmul / linear / conv nodes of an fx graph and say which can be sampled.

``match(gm, node)`` asks the matchers of every op kind in :mod:`approxcompile.kinds`
(``nn.Linear``, ``F.linear``, ``matmul``/``@``/``bmm``/``mm``, ``addmm``, ``nn.ConvNd``,
``F.convNd``) and returns the node's :class:`Site`, or ``None``. A Site that cannot be sampled
still comes back, with ``unsupported`` set to the reason, so its FLOPs count and the report
can show why. The cost pass stores each Site in the node's plan; :func:`site_of` reads it back.
"""

from __future__ import annotations

import torch.fx as fx

from approxcompile import kinds
from approxcompile.plan import NodePlan
from approxcompile.site import Site

__all__ = ["Site", "match", "site_of"]


def match(gm: fx.GraphModule, node: fx.Node) -> Site | None:
    """The :class:`Site` of ``node`` if it is a matmul / linear / conv, else ``None``."""
    return kinds.match(gm, node)


def site_of(gm: fx.GraphModule, node: fx.Node, plan: NodePlan) -> Site:
    """The Site the cost pass stored in ``plan``; matched again only for a plan built without one."""
    site = plan.site if plan.site is not None else match(gm, node)
    if site is None:
        raise ValueError(
            f"node {node.format_node()} has a plan but is no matmul / linear / conv node; "
            "plans come from passes.annotate_costs on the same graph"
        )
    return site
