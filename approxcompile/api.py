"""``optimize``: the whole pipeline, one named step a line."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch.fx as fx
from torch import nn

import approxcompile.passes as passes
from approxcompile.config import ApproxConfig, check_method
from approxcompile.errors import BudgetError
from approxcompile.plan import META_KEY, Plan


def _check_budget(budget: float) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise BudgetError(f"budget must be a number in (0, 1], got {budget!r}")
    if math.isnan(budget) or not 0.0 < budget <= 1.0:
        raise BudgetError(
            f"budget must be in (0, 1] (the fraction of the dense training FLOPs to spend), got {budget!r}"
        )
    return float(budget)


def optimize(
    model: nn.Module,
    budget: float = 0.4,
    *,
    example_inputs: Sequence[Any],
    method: str | None = None,
    config: ApproxConfig | None = None,
) -> fx.GraphModule:
    """Return ``model`` rewritten so one training step costs at most ``budget`` of its FLOPs.

    The result shares parameters with ``model`` (which is not mutated), has the same
    ``state_dict()`` keys and tensors, samples in ``train()`` mode and is exact in
    ``eval()``. ``method`` overrides ``config.method``. ``approxcompile.report(result)``
    shows what was sampled and why the rest was not.

    >>> fast = optimize(model, budget=0.4, example_inputs=(torch.randn(64, 784),))
    """
    budget = _check_budget(budget)
    config = config or ApproxConfig()
    if method is not None:
        config = dataclasses.replace(config, method=check_method(method))
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, list) else example_inputs

    # capture: a GraphModule over new module objects that share the user's tensors (fx / export / dynamo)
    front = passes.capture(model, example_inputs, frontend=config.frontend, leaf_modules=config.leaf_modules)
    gm, model = front.graph_module, front.model  # model: behind torch.compile / optimize
    if front.frontend == "dynamo":  # data-dependent control flow: planned region by region
        passes.plan_regions(gm, example_inputs, budget=budget, config=config)
        return gm
    # shapes: every node's shape / requires_grad, and the operands of each product
    captured = passes.propagate_shapes(gm, example_inputs).captured
    # cost: dense forward / input-grad / weight-grad FLOPs and sampling overhead per node
    passes.annotate_costs(gm, method=config.method, mode=config.mode)
    other_flops = passes.measure_other_flops(gm, example_inputs).other
    # exclusions: overrides, first/last node, unsupported forms, small inner dimensions
    passes.apply_exclusions(gm, config)
    # sensitivity: measured output error of each node at each keep ratio
    passes.measure_sensitivity(gm, captured, config)
    if config.measure_time:
        # timing: measured seconds per keep ratio, so no sampled node is slower than exact
        passes.measure_timing(gm, captured, config)
    del captured
    # selection: keep ratios minimising the summed error within the budget
    passes.allocate(gm, budget=budget, other_flops=other_flops)
    # rewrite: sampled nodes become calls to approxcompile.ops
    passes.rewrite(gm, config)
    # verify: well-formed graph, eval outputs equal the original's
    passes.verify(gm, model, example_inputs)

    nodes = tuple(n.meta[META_KEY] for n in gm.graph.nodes if META_KEY in n.meta)
    note = None if nodes else "no matmul / linear / conv nodes found: the model is returned unchanged"
    gm.meta[META_KEY] = Plan(
        budget=budget,
        method=config.method,
        nodes=nodes,
        other_flops=other_flops,
        note=note,
        mode=config.mode,
        scores=config.scores,
        frontend=front.frontend,
        frontend_reason=front.reason,
    )
    return gm
