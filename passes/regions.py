"""Plan one dynamo region: the passes ``optimize`` runs, on a region graph and its real inputs.

Each region must meet the budget by itself (its FLOPs are all the planner sees); a region
that cannot (say, one holding only an embedding and the first layer) is planned at its
smallest feasible budget, with a warning, and the report's fraction shows the whole.
Only the first region's first product stays exact under ``exclude_first_last``: a region does
not know where the model ends (name the last layer with ``ApproxConfig.set_module_name(...,
NodeOverride(exact=True))`` instead).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch.fx as fx

from approxcompile.errors import BudgetError
from approxcompile.passes.allocation import allocate
from approxcompile.passes.cost import annotate_costs, measure_other_flops
from approxcompile.passes.exclusions import apply_exclusions
from approxcompile.passes.rewrite import rewrite
from approxcompile.passes.sensitivity import measure_sensitivity
from approxcompile.passes.shapes import propagate_shapes
from approxcompile.plan import META_KEY, Plan

_SMALLEST = re.compile(r"smallest feasible budget is ([0-9.]+)")


def plan_region(
    region: fx.GraphModule,
    inputs: Sequence[Any],
    *,
    budget: float,
    config: Any,
    index: int,
    spent: tuple[int, int] = (0, 0),
) -> None:
    """Plan and rewrite ``region`` in place; its ``Plan`` goes to ``region.meta``.

    ``spent``: (planned, dense) FLOPs of the regions that ran before this one in the same call;
    the region's own budget makes the call as a whole meet ``budget`` where it can.
    """
    exclude_first = config.exclude_first_last
    config = dataclasses.replace(config, exclude_first_last=False)
    captured = propagate_shapes(region, inputs).captured
    annotate_costs(region, method=config.method, mode=config.mode, attention=config.attention)
    other = measure_other_flops(region, inputs).other
    apply_exclusions(region, config)
    if index == 0 and exclude_first:  # the model's first product is the first region's first
        first = next((n for n in region.graph.nodes if META_KEY in n.meta and n.meta[META_KEY].shapes), None)
        if first is not None and first.meta[META_KEY].reason is None:
            first.meta[META_KEY] = first.meta[META_KEY].with_(
                reason="first candidate node (kept exact, as in the paper)"
            )
    measure_sensitivity(region, captured, config)
    dense = sum(n.meta[META_KEY].flops.total for n in region.graph.nodes if META_KEY in n.meta) + other
    planned, dense_before = spent
    if dense > 0:
        budget = min(1.0, max(0.01, (budget * (dense_before + dense) - planned) / dense))
    try:
        allocate(region, budget=budget, other_flops=other)
    except BudgetError as e:
        found = _SMALLEST.search(str(e))
        smallest = min(1.0, float(found.group(1))) if found else 1.0
        warnings.warn(
            f"[dynamo] region {index} cannot meet budget={budget:g}; planned at {smallest:g}", stacklevel=2
        )
        allocate(region, budget=smallest, other_flops=other)
    rewrite(region, config)
    nodes = tuple(n.meta[META_KEY] for n in region.graph.nodes if META_KEY in n.meta)
    region.meta[META_KEY] = Plan(
        budget=budget,
        method=config.method,
        nodes=nodes,
        other_flops=other,
        mode=config.mode,
        scores=config.scores,
    )
