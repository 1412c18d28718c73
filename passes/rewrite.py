"""Rewrite: each node the plan samples becomes a call to its sampled op.

::

    fc1(x)            -> sampled_linear(x, fc1.weight, fc1.bias, keep=0.35, method='topk', training=training)
    linear(x, w, b)   -> sampled_linear(x, w, b, keep=..., method=..., training=training)
    matmul(a, b)      -> sampled_matmul(a, b, keep=..., method=..., training=training)
    addmm(b, x, w)    -> sampled_addmm(b, x, w, keep=..., method=..., training=training)
    conv(x)           -> sampled_conv(x, conv.weight, conv.bias, stride, padding, dilation, keep=..., ...)

With ``ApproxConfig(mode="backward")`` linear and conv nodes become
``backward_sampled_linear(x, w, b, keep=..., method='bernoulli', training=training)`` and
``backward_sampled_conv(x, w, b, stride, padding, dilation, keep=..., ...)``; with
``scores="weights"`` linear / conv calls get ``scores='weights'`` (and, for random methods,
the ``seed=`` of the node's own stream).

``training`` is one ``get_attr`` of the module's own ``self.training``, so ``.eval()`` on
the rewritten module makes every sampled op exact. Parameters are read from the
original submodules (which stay in place), so ``state_dict()`` is unchanged. The pass
mutates ``gm`` in place and reports ``modified`` exactly when a node was replaced.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import torch.fx as fx
from approxcompile.passes.base import PassResult
from approxcompile.passes.match import Site, match

from approxcompile import ops
from approxcompile.config import ApproxConfig
from approxcompile.ops.sampling import DEFAULT_EPS
from approxcompile.plan import META_KEY, NodePlan

_OPS: dict[str, Callable[..., Any]] = {
    "linear": ops.sampled_linear,
    "matmul": ops.sampled_matmul,
    "addmm": ops.sampled_addmm,
    "conv": ops.sampled_conv,
}


_BACKWARD_OPS: dict[str, Callable[..., Any]] = {
    "linear": ops.backward_sampled_linear,
    "conv": ops.backward_sampled_conv,
}


def _training_flag(graph: fx.Graph) -> fx.Node:
    """The graph's single ``training = self.training`` node, created after the inputs."""
    for node in graph.nodes:
        if node.op == "get_attr" and node.target == "training":
            return node
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1:]
    anchor = last_input[0].next if last_input else next(iter(graph.nodes))
    with graph.inserting_before(anchor):
        # create_node: Graph.get_attr warns about attributes that are not tensors/modules.
        return graph.create_node("get_attr", "training", name="training")


def _operand(graph: fx.Graph, operand: Any) -> Any:
    """Module parameters become ``get_attr`` nodes; everything else passes through."""
    return graph.get_attr(operand) if isinstance(operand, str) else operand


def _mode_kwargs(site: Site, plan: NodePlan, config: ApproxConfig) -> dict[str, Any]:
    """Keyword arguments of backward mode and of weight-only scores (none by default)."""
    if plan.mode == "backward":
        return {"row_scores": config.row_scores} if config.row_scores != "x_dy" else {}
    if config.scores != "weights" or site.kind not in ("linear", "conv"):
        return {}
    if plan.method == "topk":
        return {"scores": "weights"}
    # The node's own stream: the same on every rank, independent of the other nodes'.
    return {"scores": "weights", "seed": (config.seed * 1_000_003 + zlib.crc32(plan.name.encode())) % 2**63}


def _replace(gm: fx.GraphModule, node: fx.Node, site: Site, plan: NodePlan, config: ApproxConfig) -> None:
    graph = gm.graph
    training = _training_flag(graph)
    with graph.inserting_before(node):
        args = tuple(_operand(graph, o) for o in site.operands)
        if site.conv is not None:
            args = (*args, *site.conv)
        kwargs: dict[str, Any] = {"keep": plan.keep, "method": plan.method, "training": training}
        if config.eps != DEFAULT_EPS:
            kwargs["eps"] = config.eps
        kwargs.update(_mode_kwargs(site, plan, config))
        target = _BACKWARD_OPS[site.kind] if plan.mode == "backward" else _OPS[site.kind]
        new = graph.call_function(target, args, kwargs)
    new.meta.update({k: v for k, v in node.meta.items() if k != "tensor_meta"})
    new.meta["tensor_meta"] = node.meta.get("tensor_meta")
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def rewrite(gm: fx.GraphModule, config: ApproxConfig) -> PassResult:
    """Replace every node whose plan samples (``k < inner``) by its sampled op, in place."""
    replaced = 0
    for node in list(gm.graph.nodes):
        plan = node.meta.get(META_KEY)
        if plan is None or not plan.sampled or node.target in ops.SAMPLED_OPS:
            continue
        site = match(gm, node)
        assert site is not None, node.format_node()
        _replace(gm, node, site, plan, config)
        replaced += 1
    if replaced:
        gm.recompile()
    return PassResult(gm, modified=replaced > 0, stats={"replaced": replaced})
