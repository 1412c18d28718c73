"""Guard rails: plans that are legal but probably not what the user wants, each with its fix.

Two checks, run by ``optimize`` (as :class:`~approxcompile.errors.PlanWarning` warnings) and
shown at the foot of the report table:

- **high error**: a sampled node whose measured relative squared error at its keep ratio is
  above :data:`HIGH_ERROR` — its output is mostly sampling noise;
- **exact share**: nodes left exact before the allocation (first / last node, small inner
  dimension, overrides) take more than :data:`EXACT_SHARE` of the budget, so the rest must be
  sampled very hard.

The fixes name a budget taken from :func:`sweep`, which re-runs only the allocation over the
sensitivities ``optimize`` already measured (no model run).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from approxcompile.errors import BudgetError
from approxcompile.plan import META_KEY, NodePlan, Plan

HIGH_ERROR = 0.5  # relative squared error: above it the node's output is more noise than signal
EXACT_SHARE = 0.5  # fraction of the budget the pre-allocation exact nodes may take silently
BUDGETS = tuple(round(0.025 * i, 3) for i in range(1, 41))  # 0.025 ... 1.0


@dataclass(frozen=True, kw_only=True)
class SweepPoint:
    """The allocation at one budget: summed and largest node error, planned fraction of dense."""

    budget: float
    total_error: float
    max_error: float
    fraction: float
    sampled: int


@dataclass(frozen=True, kw_only=True)
class Guard:
    """One warning about a plan: what is wrong (``message``) and what to change (``fix``)."""

    check: str  # "high-error" | "exact-share"
    nodes: tuple[str, ...]
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.message}; fix: {self.fix}"


def _allocatable(p: NodePlan) -> bool:
    # The sensitivity pass measures exactly the nodes the allocation may sample, so a curve
    # marks a node whose "exact" reason (if any) came from the allocation itself.
    return bool(p.sensitivity) and p.fixed_keep is None


def sweep(plan: Plan, budgets: Sequence[float] = BUDGETS) -> tuple[SweepPoint, ...]:
    """Planned error against budget: the allocation re-run at each budget (infeasible ones left out)."""
    import approxcompile.passes as passes

    allocate = getattr(passes.allocate, "__wrapped__", passes.allocate)  # no log line per budget
    graph = fx.Graph()
    base: dict[str, NodePlan] = {}
    for i, p in enumerate(plan.nodes):
        node = graph.placeholder(f"n{i}")
        if _allocatable(p):
            row = {"row_keep": 1.0} if p.split else {}
            p = p.with_(keep=1.0, k=p.inner, est_error=0.0, reason=None, **row)
        base[node.name] = p
    graph.output(None)
    gm = fx.GraphModule(nn.Module(), graph)
    points = []
    for budget in budgets:
        for node in gm.graph.nodes:
            if node.name in base:
                node.meta[META_KEY] = base[node.name]
        try:
            fraction = allocate(gm, budget=budget, other_flops=plan.other_flops).fraction
        except BudgetError:
            continue
        chosen = [n.meta[META_KEY] for n in gm.graph.nodes if n.name in base]
        errors = [p.est_error for p in chosen if p.sampled]
        points.append(
            SweepPoint(
                budget=budget,
                total_error=sum(errors),
                max_error=max(errors, default=0.0),
                fraction=fraction,
                sampled=len(errors),
            )
        )
    return tuple(points)


def _sensible_budget(points: Sequence[SweepPoint], above: float) -> float | None:
    """The smallest swept budget above ``above`` whose plan keeps every node under HIGH_ERROR."""
    ok = [p.budget for p in points if p.budget > above and p.max_error <= HIGH_ERROR]
    return min(ok, default=None)


def _names(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names)


def check(plan: Plan, points: Sequence[SweepPoint] | None = None) -> tuple[Guard, ...]:
    """The guard-rail warnings of ``plan`` (empty when nothing looks wrong)."""
    if not plan.nodes or plan.dense_flops == 0:
        return ()
    guards: list[Guard] = []
    noisy = [n for n in plan.nodes if n.sampled and n.est_error > HIGH_ERROR and n.fixed_keep is None]
    pre_exact = [n for n in plan.nodes if not n.sampled and not _allocatable(n) and n.fixed_keep is None]
    exact_flops = sum(n.flops.total for n in pre_exact)
    share = exact_flops / (plan.budget * plan.dense_flops)
    if not noisy and share <= EXACT_SHARE:
        return ()
    points = sweep(plan) if points is None else points
    sensible = _sensible_budget(points, plan.budget)
    bigger = (
        f"budget={sensible:g} keeps every node's error under {HIGH_ERROR:g}"
        if sensible is not None
        else "a larger budget"
    )
    ends = [n.name for n in pre_exact if n.reason and n.reason.startswith(("first ", "last "))]
    unexclude = f"ApproxConfig(exclude_first_last=False) lets {_names(ends)} be sampled"
    if noisy:
        worst = max(noisy, key=lambda n: n.est_error)
        listed = ", ".join(f"{n.name!r} keeps {n.k}/{n.inner} (err {n.est_error:.2f})" for n in noisy)
        fixes = [bigger] + ([unexclude] if ends and share > EXACT_SHARE else [])
        fixes.append(f"NodeOverride(exact=True) for {worst.name!r}")
        guards.append(
            Guard(
                check="high-error",
                nodes=tuple(n.name for n in noisy),
                message=f"{listed}: measured relative error above {HIGH_ERROR:g}, the output is mostly "
                "sampling noise",
                fix="; or ".join(fixes),
            )
        )
    if share > EXACT_SHARE:
        top = sorted(pre_exact, key=lambda n: -n.flops.total)[:3]
        listed = ", ".join(
            f"{n.name!r} {n.flops.total / plan.dense_flops:.0%} of dense ({(n.reason or '').split(' (')[0]})"
            for n in top
        )
        fixes = ([unexclude] if ends else []) + [bigger]
        guards.append(
            Guard(
                check="exact-share",
                nodes=tuple(n.name for n in pre_exact),
                message=f"nodes exact whatever the budget take {share:.0%} of budget {plan.budget:g}: "
                f"{listed}",
                fix="; or ".join(fixes),
            )
        )
    return tuple(guards)
