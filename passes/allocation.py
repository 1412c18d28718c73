"""Allocation: how much to sample each node under the FLOP budget.

``allocate`` picks a keep ratio per node the exclusions left eligible that minimises the
summed relative error subject to ``sum(cost) <= budget * dense``: each node's (cost, error)
options are reduced to their lower convex hull, and the cheapest error-per-FLOP step is
taken until the budget holds. It updates ``node.meta["approxcompile"]`` only; the graph is
unchanged.
"""

from __future__ import annotations

import math

import torch.fx as fx

from approxcompile.errors import BudgetError
from approxcompile.passes.base import AllocationResult
from approxcompile.plan import META_KEY, NodePlan, kept_count


def _planned(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if META_KEY in n.meta]


def _hull(options: list[tuple[int, float, float]]) -> list[tuple[int, float, float]]:
    """Lower convex hull of (cost, error, keep) points, from the most expensive (exact) down."""
    kept: list[tuple[int, float, float]] = []
    best = math.inf
    for opt in sorted(options, key=lambda o: (o[0], o[1])):  # drop dominated: dearer and no better
        if opt[1] < best:
            kept.append(opt)
            best = opt[1]
    kept.reverse()

    def slope(a: tuple[int, float, float], b: tuple[int, float, float]) -> float:
        return (b[1] - a[1]) / max(a[0] - b[0], 1)

    hull: list[tuple[int, float, float]] = []
    for opt in kept:
        while len(hull) >= 2 and slope(hull[-2], hull[-1]) >= slope(hull[-1], opt):
            hull.pop()
        hull.append(opt)
    return hull


def _options(plan: NodePlan) -> list[tuple[int, float, float]]:
    dense = plan.flops.total
    opts = [(dense, 0.0, 1.0)]
    for keep, err in plan.sensitivity:
        cost = plan.cost(kept_count(keep, plan.inner))
        # A ratio whose overhead eats the FLOP savings, or that measured slower than the
        # dense op, is never worth it.
        if cost < dense and plan.saves_time(keep):
            opts.append((cost, err, keep))
    return opts


def _error_at(plan: NodePlan, keep: float) -> float:
    return next((e for r, e in plan.sensitivity if r == keep), 0.0)


def _spend_leftover(
    chosen: dict[str, tuple[int, float, float]],
    admissible: dict[str, list[tuple[int, float, float]]],
    leftover: float,
) -> int:
    """Move nodes to dearer, more accurate options while the budget holds; returns the FLOPs added.

    The hull walk stops at the first step that fits, which can undershoot the budget by
    most of a large step (measured: a plan at 0.324 of dense for budget 0.4). Any admissible
    option, on the hull or not, may take up the rest; best error reduction per FLOP first.
    """
    added = 0
    while True:
        best: tuple[float, str, tuple[int, float, float]] | None = None
        for name, (cost, err, _) in chosen.items():
            for opt in admissible[name]:
                extra = opt[0] - cost
                if 0 < extra <= leftover - added and opt[1] < err:
                    gain = (err - opt[1]) / extra
                    if best is None or gain > best[0]:
                        best = (gain, name, opt)
        if best is None:
            return added
        _, name, opt = best
        added += opt[0] - chosen[name][0]
        chosen[name] = opt


def _holders(plans: dict[str, NodePlan], dense: int) -> str:
    """The exact nodes that hold most of the unsampleable FLOPs, largest first, for the budget error."""
    exact = sorted((p for p in plans.values() if p.reason is not None), key=lambda p: -p.flops.total)[:5]
    if not exact:
        return ""
    rows = ", ".join(f"{p.name} {p.flops.total / dense:.3f} [{p.reason}]" for p in exact)
    return f"; the largest exact nodes: {rows}"


def allocate(gm: fx.GraphModule, *, budget: float, other_flops: int) -> AllocationResult:
    """Choose ``keep`` / ``k`` for every eligible node so the step fits ``budget`` of dense FLOPs."""
    nodes = _planned(gm)
    plans = {n.name: n.meta[META_KEY] for n in nodes}
    dense = sum(p.flops.total for p in plans.values()) + other_flops
    fixed = other_flops
    admissible: dict[str, list[tuple[int, float, float]]] = {}
    choices: dict[str, list[tuple[int, float, float]]] = {}  # lower convex hull of admissible
    for name, p in plans.items():
        if p.reason is not None:
            fixed += p.flops.total
        elif p.fixed_keep is not None:
            fixed += p.cost(kept_count(p.fixed_keep, p.inner))
        else:
            admissible[name] = _options(p)
            choices[name] = _hull(admissible[name])
    target = budget * dense
    smallest = fixed + sum(opts[-1][0] for opts in choices.values())
    if smallest > target * (1 + 1e-9):
        raise BudgetError.infeasible(
            smallest / dense,
            f"[select] budget={budget:g} cannot be met: the nodes left exact, the fixed keep ratios and "
            f"the smallest keep ratios allowed (keep_grid, min_k) cost {smallest / dense:.4f} of the dense "
            f"training step ({fixed / dense:.4f} of it cannot be sampled at all{_holders(plans, dense)}); "
            f"the smallest feasible budget is {math.ceil(smallest / dense * 1000) / 1000:.3f}",
        )
    at = dict.fromkeys(choices, 0)
    total = fixed + sum(opts[0][0] for opts in choices.values())
    while total > target:
        movable = [n for n in choices if at[n] + 1 < len(choices[n])]
        if not movable:  # within the rounding tolerance above: the smallest options it is
            break
        name = min(
            movable,
            key=lambda n: (
                (choices[n][at[n] + 1][1] - choices[n][at[n]][1])
                / max(choices[n][at[n]][0] - choices[n][at[n] + 1][0], 1)
            ),
        )
        total -= choices[name][at[name]][0] - choices[name][at[name] + 1][0]
        at[name] += 1
    chosen = {n: choices[n][at[n]] for n in choices}
    total += _spend_leftover(chosen, admissible, target - total)
    sampled = 0
    for node in nodes:
        p = plans[node.name]
        if p.reason is not None:
            continue
        keep = p.fixed_keep if p.fixed_keep is not None else chosen[node.name][2]
        k = kept_count(keep, p.inner)
        if k >= p.inner:
            if p.fixed_keep is not None:
                why = "fixed keep rounds to k = n"
            elif p.timing and len(admissible[node.name]) == 1:
                dense_ms = dict(p.timing)[1.0] * 1e3
                why = f"sampling measured no faster than the dense op ({dense_ms:.2f} ms) at any keep ratio"
            else:
                why = "budget is met without sampling this node"
            node.meta[META_KEY] = p.with_(keep=1.0, k=p.inner, est_error=0.0, reason=why)
            continue
        node.meta[META_KEY] = p.with_(keep=keep, k=k, est_error=_error_at(p, keep))
        sampled += 1
    return AllocationResult(
        graph_module=gm, modified=False, sampled=sampled, fraction=total / dense if dense else 1.0
    )
