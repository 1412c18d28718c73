"""Cost model: what each matmul / linear / conv node costs in a training step.

For every matched node this pass writes a :class:`NodePlan` to
``node.meta["approxcompile"]`` with

- dense FLOPs of the forward, input-gradient (only when autograd needs it) and
  weight-gradient products, in the 2·M·N·K convention of ``FlopCounterMode``;
- the sampling overhead FLOPs (score norms, selection, gathers and their scatters),
  which ``FlopCounterMode`` does not see but the budget is charged for.

``measure_other_flops`` runs one forward + backward under ``FlopCounterMode`` and returns
what it counts outside these nodes (e.g. ``scaled_dot_product_attention``), so the
budget's denominator is the whole step as ``FlopCounterMode`` measures it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from approxcompile import kinds
from approxcompile.choices import Attention, Method, Mode
from approxcompile.passes.base import CostResult, StepFlops
from approxcompile.passes.flops import FLOP_FIXES
from approxcompile.passes.match import Site, match, operand_tensor
from approxcompile.plan import META_KEY, Flops, NodePlan


def _shape_grad(gm: fx.GraphModule, operand: Any) -> tuple[tuple[int, ...], bool] | None:
    """Shape and requires_grad of a site operand, ``None`` when unknown."""
    if isinstance(operand, str):
        p = operand_tensor(gm, operand)
        return tuple(p.shape), p.requires_grad
    if isinstance(operand, fx.Node) and "tensor_meta" in operand.meta:
        tm = operand.meta["tensor_meta"]
        return tuple(tm.shape), bool(tm.requires_grad)
    return None


def _products(site: Site, gm: fx.GraphModule, node: fx.Node) -> tuple[Any, ...] | str:
    """(operand shapes, out shape, products, x needs grad, w needs grad) or why the shapes are unknown."""
    kind = kinds.KINDS[site.kind]
    known = [_shape_grad(gm, site.operands[i]) for i in kind.factors]
    out = node.meta.get("tensor_meta")
    if any(k is None for k in known) or out is None:
        return "unknown shape (not a tensor in shape propagation)"
    (xs, xg), (ws, wg) = known  # type: ignore[misc]
    out_shape = tuple(out.shape)
    products = kind.products(xs, ws, out_shape)
    if isinstance(products, str):
        return products
    return (xs, ws), out_shape, products, xg, wg


def _backward_costs(plan: NodePlan, site: Site) -> NodePlan:
    """Backward mode: dX samples the output features / channels, dW the batch rows / samples.

    ``inner`` becomes the output width p (dX's inner dimension) and ``rows`` the batch M
    (dW's). Overhead: norms of W per output, of dY per output and per row, of X per row;
    per kept output a slice of dY and of W, per kept row a slice of X and of dY. Linear and
    conv nodes (``backward_split``) get ``row_keep`` and the dW share of the overhead apart
    (``row_overhead_*``), so the allocation sizes the two products separately.
    """
    plan = plan.with_(mode="backward")
    if plan.reason is not None:
        return plan
    kind = kinds.KINDS[site.kind]
    if kind.backward_op is None or kind.backward_rows is None:
        return plan.with_(reason=kinds.backward_only_message())
    why = kind.backward_unsupported(site)
    if why is not None:
        return plan.with_(reason=why)
    (xs, ws), out = plan.shapes, plan.out_shape
    x_numel, w_numel, y_numel = math.prod(xs), math.prod(ws), math.prod(out)
    p = kind.backward_out(xs, ws)
    rows = kind.backward_rows(xs, ws)
    if kind.backward_split:  # dX and dW sampled at their own ratios: each charged its own overhead
        return plan.with_(
            inner=p,
            k=p,
            rows=rows,
            row_keep=1.0,
            overhead_fixed=2 * (w_numel + y_numel),
            overhead_per_kept=(y_numel + w_numel) // p,
            row_overhead_fixed=2 * (x_numel + y_numel),
            row_overhead_per_kept=(x_numel + y_numel) // max(rows, 1),
        )
    fixed = 2 * (w_numel + 2 * y_numel + x_numel)
    per_kept = y_numel // p + w_numel // p + (x_numel + y_numel) // p
    return plan.with_(inner=p, k=p, rows=rows, overhead_fixed=fixed, overhead_per_kept=per_kept)


def plan_for(
    site: Site, gm: fx.GraphModule, node: fx.Node, method: Method, mode: Mode = "forward"
) -> NodePlan:
    """The dense cost record of one node (nothing decided yet)."""
    if mode == "backward":
        return _backward_costs(plan_for(site, gm, node, method), site)
    facts = _products(site, gm, node)
    if isinstance(facts, str):
        out = node.meta.get("tensor_meta")
        return NodePlan(
            name=site.name,
            kind=kinds.KINDS[site.kind].op_type,
            op=site.op,
            shapes=(),
            out_shape=tuple(out.shape) if out is not None else (),
            inner=1,
            flops=Flops(0, 0, 0),
            method=method,
            reason=facts,
            site=site,
        )
    shapes, out_shape, products, xg, wg = facts
    fwd = products.forward
    return NodePlan(
        name=site.name,
        kind=kinds.KINDS[site.kind].op_type,
        op=site.op,
        shapes=shapes,
        out_shape=out_shape,
        inner=products.inner,
        flops=Flops(fwd, fwd if xg else 0, fwd if wg else 0),
        overhead_fixed=products.overhead_fixed,
        overhead_per_kept=products.overhead_per_kept,
        method=method,
        reason=site.unsupported,
        site=site,
    )


def annotate_costs(
    gm: fx.GraphModule, *, method: Method, mode: Mode = "forward", attention: Attention = "exact"
) -> CostResult:
    """Write a dense :class:`NodePlan` to every matched node's meta (graph unchanged).

    ``mode="backward"`` costs the kinds with a backward-mode op (linear, conv, matmul,
    attention) for backward sampling and gives every other candidate a reason to stay exact.
    ``attention="exact"`` gives ``scaled_dot_product_attention`` nodes theirs (its FLOPs count).
    """
    count = 0
    for node in gm.graph.nodes:
        site = match(gm, node)
        if site is not None and site.kind == "attention" and attention == "exact" and not site.unsupported:
            site = dataclasses.replace(site, unsupported=kinds.ATTENTION_EXACT)
        if site is not None:
            node.meta[META_KEY] = plan_for(site, gm, node, method, mode)
            count += 1
    return CostResult(graph_module=gm, modified=False, candidates=count)


def measure_step_flops(module: torch.nn.Module, example_inputs: Sequence[Any]) -> int:
    """FLOPs ``FlopCounterMode`` counts in one forward + backward of ``module``.

    Gradients are taken with ``torch.autograd.grad`` so no ``.grad`` is written, and the
    module runs in its current mode.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    with FlopCounterMode(display=False, custom_mapping=FLOP_FIXES) as counter:
        outputs = [t for t in tree_leaves(module(*example_inputs)) if isinstance(t, torch.Tensor)]
        loss = sum((t.float().sum() for t in outputs if t.requires_grad), torch.zeros(()))
        if params and loss.requires_grad:
            torch.autograd.grad(loss, params, allow_unused=True)
    return int(counter.get_total_flops())


def measure_other_flops(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> StepFlops:
    """A dense training step's FLOPs as ``FlopCounterMode`` counts them, against the planned nodes'.

    ``.other`` is what falls outside the matched nodes (0 when the step could not be counted).
    """
    matched = sum(n.meta[META_KEY].flops.total for n in gm.graph.nodes if META_KEY in n.meta)
    was_training = gm.training
    gm.eval()  # same products, and BatchNorm statistics stay untouched
    try:
        total = measure_step_flops(gm, example_inputs)
    except Exception as e:  # counting is advisory; the plan stays valid without it
        warnings.warn(
            f"[cost] FlopCounterMode could not count a training step ({e}); "
            "FLOPs outside matmul/linear/conv nodes are taken as 0",
            stacklevel=2,
        )
        return StepFlops(step=0, matched=matched, counted=False)
    finally:
        gm.train(was_training)
    return StepFlops(step=total, matched=matched, counted=True)
