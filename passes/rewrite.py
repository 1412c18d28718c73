"""Rewrite: each node the plan samples becomes a call to its sampled op.

::

    fc1(x)            -> sampled_linear(x, fc1.weight, fc1.bias, keep=0.35, method='topk', training=training)
    linear(x, w, b)   -> sampled_linear(x, w, b, keep=..., method=..., training=training)
    matmul(a, b)      -> sampled_matmul(a, b, keep=..., method=..., training=training)
    addmm(b, x, w)    -> sampled_addmm(b, x, w, keep=..., method=..., training=training)
    conv(x)           -> sampled_conv(x, conv.weight, conv.bias, stride, padding, dilation, keep=..., ...)
    sdpa(q, k, v, m, p, causal, scale) -> sampled_attention(q, k, v, m, p, causal, scale, keep=..., ...)

With ``ApproxConfig(mode="backward")`` linear and conv nodes become
``backward_sampled_linear(x, w, b, keep=..., method='bernoulli', training=training)`` and
``backward_sampled_conv(x, w, b, stride, padding, dilation, keep=..., ...)`` (matmul and
attention nodes: ``backward_sampled_matmul`` / ``backward_sampled_attention``); with
``scores="weights"`` linear / conv calls get ``scores='weights'`` (and, for random methods,
the ``seed=`` of the node's own stream).

An exact conv whose output reaches a sampled conv becomes ``sampled_conv(..., keep=1.0)``: the
exact convolution, whose backward skips the output channels the sampled conv left without
gradient (``approxcompile.ops.kernels.live_conv``). Where its output reaches sampled convs
only, through channel-wise ops, the call also gets ``live=`` the number of channels those
convs keep (:func:`live_bound`), which the compiled backward needs to skip channels at
static shapes.

``training`` is one ``get_attr`` of the module's own ``self.training``, so ``.eval()`` on
the rewritten module makes every sampled op exact. Parameters are read from the
original submodules (which stay in place), so ``state_dict()`` is unchanged. The pass
mutates ``gm`` in place and reports ``modified`` exactly when a node was replaced.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from approxcompile import kinds, ops
from approxcompile.config import ApproxConfig
from approxcompile.ops.sampling import DEFAULT_EPS
from approxcompile.passes.base import RewriteResult
from approxcompile.passes.match import Site, site_of
from approxcompile.plan import META_KEY, NodePlan, kept_count


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
    """Keyword arguments of backward mode, weight-only scores and reused weight norms (none by default)."""
    if plan.mode == "backward":
        return {"row_scores": config.row_scores} if config.row_scores != "x_dy" else {}
    if not kinds.KINDS[site.kind].weight_scores:
        return {}
    every = {"weight_norms_every": config.weight_norms_every} if config.weight_norms_every != 1 else {}
    if config.scores != "weights":
        return every
    if plan.method == "topk":
        return {"scores": "weights", **every}
    # The node's own stream: the same on every rank, independent of the other nodes'.
    seed = (config.seed * 1_000_003 + zlib.crc32(plan.name.encode())) % 2**63
    return {"scores": "weights", "seed": seed, **every}


def _replace(
    gm: fx.GraphModule,
    node: fx.Node,
    site: Site,
    plan: NodePlan,
    config: ApproxConfig,
    replaced: dict[fx.Node, fx.Node],
) -> None:
    graph = gm.graph
    training = _training_flag(graph)
    with graph.inserting_before(node):
        # An operand the site recorded may be a node replaced earlier in this pass.
        args = tuple(
            _operand(graph, replaced.get(o, o) if isinstance(o, fx.Node) else o) for o in site.operands
        )
        if site.conv is not None:
            args = (*args, *site.conv)
        kwargs: dict[str, Any] = {"keep": plan.keep, "method": plan.method, "training": training}
        if plan.split:
            kwargs["row_keep"] = plan.row_keep
        if config.eps != DEFAULT_EPS:
            kwargs["eps"] = config.eps
        kwargs.update(_mode_kwargs(site, plan, config))
        live = None if plan.sampled or plan.kind != "conv" or plan.mode != "forward" else live_bound(node)
        if live is not None:
            kwargs["live"] = live
        target = kinds.KINDS[site.kind].runtime_op(plan.mode)
        new = graph.call_function(target, args, kwargs)
    new.meta.update({k: v for k, v in node.meta.items() if k != "tensor_meta"})
    new.meta["tensor_meta"] = node.meta.get("tensor_meta")
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    replaced[node] = new


def _exact_live(node: fx.Node, plan: NodePlan, hooked: frozenset[str]) -> bool:
    """An exact forward-mode conv the op can run: it becomes a ``keep=1.0`` call of ``sampled_conv``.

    Why: that call is the exact convolution, but its backward skips output channels whose
    gradient is zero everywhere, which is what a sampled conv after it leaves. On the CNN
    benchmark's budget-0.4 plan, ``convs.0`` (kept exact as the first layer) sits in front
    of ``convs.1`` keeping 16 of 128 channels, and ``convs.2`` (left exact by the
    allocation) in front of ``convs.3`` keeping 96. Nodes the matcher could not run sampled
    (``site.unsupported``: grouped, a weight that is no plain parameter) stay as they are,
    and so do modules with hooks, which a function call would not fire.
    """
    site = plan.site
    if not (
        plan.kind == "conv"
        and plan.mode == "forward"
        and site is not None
        and site.unsupported is None
        and plan.flops.total > 0
    ):
        return False
    if node.op == "call_module" and str(node.target) in hooked:
        return False
    return _feeds_sampled_conv(node)


def _feeds_sampled_conv(node: fx.Node) -> bool:
    """Whether ``node``'s output reaches a sampled conv before any other product node.

    Only there can its gradient have dead channels; elsewhere the graph stays as it was.
    """
    seen: set[fx.Node] = set()
    todo = list(node.users)
    while todo:
        user = todo.pop()
        if user in seen:
            continue
        seen.add(user)
        plan = user.meta.get(META_KEY)
        if plan is not None:  # a product node: the gradient's channels are its business
            if plan.sampled and plan.kind == "conv" and plan.mode == "forward":
                return True
            continue
        todo.extend(user.users)
    return False


# Ops whose input gradient is zero on every channel where their output gradient is: they act
# channel by channel (batch norm too: a channel's input gradient is a function of that
# channel's output gradient, zero when it is).
_CHANNELWISE_FUNCTIONS = frozenset(
    {
        F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish, F.mish,
        torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.dropout, F.dropout2d,
        F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
        F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    }
)  # fmt: skip
_CHANNELWISE_METHODS = frozenset({"relu", "sigmoid", "tanh"})
_CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Dropout, nn.Dropout2d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
)  # fmt: skip
# Methods whose kept channels are at most k distinct ones (bernoulli keeps a random count).
_BOUNDED_METHODS = frozenset({"topk", "uniform", "crs", "wta_crs"})


def _only_input(user: fx.Node, value: fx.Node) -> bool:
    """``value`` is ``user``'s first argument and none of its others."""
    rest = [*user.args[1:], *user.kwargs.values()]
    return bool(user.args) and user.args[0] is value and value not in rest


def _channelwise(gm: fx.GraphModule, user: fx.Node, value: fx.Node) -> bool:
    """``user`` maps ``value`` channel by channel to one tensor (pools without their indices)."""
    if not _only_input(user, value) or user.kwargs.get("return_indices"):
        return False
    if user.op == "call_function":
        pool = "pool" in getattr(user.target, "__name__", "")
        return user.target in _CHANNELWISE_FUNCTIONS and not (pool and len(user.args) > 6)
    if user.op == "call_method":
        return user.target in _CHANNELWISE_METHODS
    if user.op == "call_module":
        module = gm.get_submodule(str(user.target))
        return isinstance(module, _CHANNELWISE_MODULES) and not getattr(module, "return_indices", False)
    return False


def live_bound(node: fx.Node) -> int | None:
    """At most how many output channels of the conv ``node`` can get a nonzero gradient; ``None``: unknown.

    Known when every use of its output reaches, through channel-wise ops only, the input of a
    forward-sampled conv whose method keeps at most ``k`` distinct channels: then only those
    get a gradient, at most the sum of their ``k``. The kept counts are the plans' (the
    graph's ``keep=`` arguments): :func:`refresh_live` writes the bounds again after
    ``set_budget`` changes them.
    """
    gm = node.graph.owning_module
    if gm is None:
        return None
    total = 0
    todo, seen = [node], set()
    while todo:
        value = todo.pop()
        for user in value.users:
            if user in seen:
                continue
            seen.add(user)
            plan = user.meta.get(META_KEY)
            if plan is not None:  # a product node: a sampled conv's input, or nothing is known
                bounded = plan.kind == "conv" and plan.mode == "forward" and plan.method in _BOUNDED_METHODS
                if not (bounded and plan.sampled and _only_input(user, value)):
                    return None
                total += kept_count(plan.keep, plan.inner)
            elif _channelwise(gm, user, value):
                todo.append(user)
            else:
                return None
    return total or None


def refresh_live(gm: fx.GraphModule) -> None:
    """Write every exact conv call's ``live=`` bound again from the current plans (:func:`live_bound`)."""
    for node in gm.graph.nodes:
        plan = node.meta.get(META_KEY)
        if node.op != "call_function" or node.target is not ops.sampled_conv or plan is None:
            continue
        live = None if plan.sampled else live_bound(node)
        if live is None:
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "live"}
        else:
            node.update_kwarg("live", live)


def rewrite(
    gm: fx.GraphModule, config: ApproxConfig, *, measured: bool = False, hooked: frozenset[str] = frozenset()
) -> RewriteResult:
    """Replace every node whose plan samples (``k < inner``) by its sampled op, in place.

    ``measured``: also the exact nodes that have a sensitivity curve, as ``keep=1.0`` calls
    (exact at run time), so ``approxcompile.set_budget`` can later change any node's keep
    ratio by editing one keyword argument instead of the graph's structure. Exact
    forward-mode convs in front of a sampled conv always become such calls (:func:`_exact_live`),
    except the modules named in ``hooked`` (the user's model's modules with hooks, which a
    function call would not fire).

    Afterwards no plan keeps its ``site``: the Site refers to nodes of the graph as it was, and
    the plans outlive this pass (``optimize`` collects them into the module's ``Plan``).
    """
    replaced: dict[fx.Node, fx.Node] = {}
    for node in list(gm.graph.nodes):
        plan = node.meta.get(META_KEY)
        if plan is None or node.target in ops.SAMPLED_OPS:
            continue
        if not (plan.sampled or (measured and plan.sensitivity) or _exact_live(node, plan, hooked)):
            continue
        _replace(gm, node, site_of(gm, node, plan), plan, config, replaced)
    for node in gm.graph.nodes:
        plan = node.meta.get(META_KEY)
        if plan is not None and plan.site is not None:
            node.meta[META_KEY] = plan.with_(site=None)
    if replaced:
        gm.recompile()
    return RewriteResult(graph_module=gm, modified=len(replaced) > 0, replaced=len(replaced))
