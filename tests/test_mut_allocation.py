"""Budget allocation cases found by mutation testing, each optimum worked out by hand.

Nodes with made-up (keep, error) curves on a chain of Linear layers, as in
``tests/test_allocation.py``: forward FLOPs ``f`` per node, so ``3·f`` dense and ``3·f·keep``
sampled (no overhead). The comments hold the arithmetic.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from approxcompile.errors import BudgetError
from approxcompile.passes import allocate
from approxcompile.plan import META_KEY, Flops, NodePlan
from tests.plans import linear_plan


class Chain(nn.Module):
    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        for name in names:
            setattr(self, name, nn.Linear(100, 100))
        self.names = names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.names:
            x = getattr(self, name)(x)
        return x


def _graph(
    curves: dict[str, tuple[int, tuple[tuple[float, float], ...]]],
    *,
    forward_only: bool = False,
    reasons: dict[str, str] | None = None,
) -> torch.fx.GraphModule:
    """``forward_only``: Flops(f, 0, 0), so a node costs ``f·k/100`` (1 FLOP per kept column at f = 100)."""
    gm = torch.fx.symbolic_trace(Chain(tuple(curves)))
    for node in gm.graph.nodes:
        if node.op == "call_module":
            f, sensitivity = curves[node.target]
            node.meta[META_KEY] = linear_plan(
                node.target,
                1,
                100,
                100,
                flops=Flops(f, 0, 0) if forward_only else Flops(f, f, f),
                sensitivity=sensitivity,
                reason=(reasons or {}).get(node.target),
            )
    return gm


def _plans(gm: torch.fx.GraphModule) -> dict[str, NodePlan]:
    return {n.target: n.meta[META_KEY] for n in gm.graph.nodes if META_KEY in n.meta}


def test_the_greedy_step_is_ranked_by_error_per_flop_saved_not_per_flop_spent() -> None:
    # Three nodes, dense 3000 each (9000); budget 0.75 -> 6750, so 2250 must go.
    #   a: 0.5 -> 1500 (saves 1500, error 0.07): 0.07/1500 = 4.7e-5 per FLOP saved
    #   b: 0.25 -> 750 (saves 2250, error 0.10): 0.10/2250 = 4.4e-5  <- the cheapest step
    #   c: 0.5 -> 1500 (saves 1500, error 0.08): 0.08/1500 = 5.3e-5
    # b alone reaches 6750 exactly: summed error 0.10. Ranking by error over the node's cost
    # (3000 each) would cut a then c (0.15), and no single move back fits the 750 left.
    gm = _graph(
        {
            "a": (1000, ((0.5, 0.07),)),
            "b": (1000, ((0.25, 0.10),)),
            "c": (1000, ((0.5, 0.08),)),
        }
    )
    result = allocate(gm, budget=0.75, other_flops=0)
    plans = _plans(gm)
    assert {n: (p.keep, p.k) for n, p in plans.items()} == {"a": (1.0, 100), "b": (0.25, 25), "c": (1.0, 100)}
    assert result.stats["fraction"] == pytest.approx(0.75)
    assert result.stats["sampled"] == 1


def test_the_estimated_error_is_the_one_measured_at_the_chosen_keep() -> None:
    # Curves listed from the smallest keep up (a keep_grid given in that order).
    # a: 0.25 -> 750 (0.40), 0.5 -> 1500 (0.10); b the same with errors 0.50, 0.20.
    # Budget 0.5 of 6000 = 3000: a .5 + b .5 = 3000 (0.30) is the only pair with both
    # sampled at 0.5 that fits and beats a .25 + b .25 (0.90), a .25 + b .5 (0.60).
    # b's curve runs the other way, from the largest keep down, with 0.75 -> 2250 (0.04) first.
    # Hull walk (error per FLOP saved): b to .75 (0.04/750), a to .5 (0.10/1500), b to .5
    # (0.16/750) reaches 3000; a .25 + b .75 = 3000 (0.44) would be worse.
    gm = _graph(
        {
            "a": (1000, ((0.25, 0.40), (0.5, 0.10))),
            "b": (1000, ((0.75, 0.04), (0.5, 0.20), (0.25, 0.50))),
        }
    )
    allocate(gm, budget=0.5, other_flops=0)
    plans = _plans(gm)
    assert (plans["a"].keep, plans["a"].est_error) == (0.5, 0.10)
    assert (plans["b"].keep, plans["b"].est_error) == (0.5, 0.20)


def test_a_node_left_dense_has_no_estimated_error() -> None:
    # 0.9 of 6000 = 5400: a to 0.75 (2250, error 0.01) is enough; b stays dense with error 0
    gm = _graph({"a": (1000, ((0.75, 0.01),)), "b": (1000, ((0.75, 0.30),))})
    allocate(gm, budget=0.9, other_flops=0)
    plans = _plans(gm)
    assert (plans["a"].keep, plans["a"].est_error, plans["a"].reason) == (0.75, 0.01, None)
    assert (plans["b"].keep, plans["b"].est_error) == (1.0, 0.0)
    assert plans["b"].reason == "budget is met without sampling this node"


def test_of_two_keep_ratios_costing_the_same_the_more_accurate_one_is_chosen() -> None:
    # keep 0.5 and 0.504 both round to k = 50 of 100: the same 1500 FLOPs; 0.504 measured the
    # smaller error (0.1 against 0.3). The budget is the smallest feasible one less a rounding
    # error (1500 of 3000, times 1 - 1e-12), which the allocation accepts and meets with its
    # cheapest options: the 0.504 one, never the same-cost 0.5 with three times the error.
    gm = _graph({"a": (1000, ((0.5, 0.3), (0.504, 0.1)))})
    allocate(gm, budget=0.5 * (1 - 1e-12), other_flops=0)
    plan = _plans(gm)["a"]
    assert (plan.keep, plan.k, plan.est_error) == (0.504, 50, 0.1)


def test_the_leftover_takes_a_step_of_a_single_flop() -> None:
    # Forward FLOPs only, 100 per node, 1 per kept column: dense 200, budget 0.455 -> 91.
    #   b: 0.51 -> 51 (0.100), 0.5 -> 50 (0.103); a: 0.4 -> 40 (0.300)
    # Hull walk by error per FLOP saved: b to .51 (0.1/49), b to .5 (0.003/1), a to .4 (0.3/60)
    # -> 50 + 40 = 90. One FLOP is left: b back to 0.51 costs exactly 1 and gains 0.003.
    gm = _graph({"a": (100, ((0.4, 0.3),)), "b": (100, ((0.51, 0.1), (0.5, 0.103)))}, forward_only=True)
    result = allocate(gm, budget=0.455, other_flops=0)
    plans = _plans(gm)
    assert (plans["a"].k, plans["b"].keep, plans["b"].k) == (40, 0.51, 51)
    assert result.stats["fraction"] == pytest.approx(91 / 200)


def test_an_infeasible_budget_says_what_cannot_be_sampled_by_hand() -> None:
    # a: dense 3000, smallest 0.25 -> 750; b: exact for a reason, 6000 of the 9000.
    # smallest = 6000 + 750 = 6750 -> 0.7500 of dense; fixed 6000 -> 0.6667; b holds 0.667.
    gm = _graph(
        {"a": (1000, ((0.5, 0.1), (0.25, 0.3))), "b": (2000, ((0.5, 0.1),))},
        reasons={"b": "left exact by override (global)"},
    )
    want = (
        "[select] budget=0.5 cannot be met: the nodes left exact, the fixed keep ratios and the "
        "smallest keep ratios allowed (keep_grid, min_k) cost 0.7500 of the dense training step "
        "(0.6667 of it cannot be sampled at all; the largest exact nodes: b 0.667 [left exact by "
        "override (global)]); the smallest feasible budget is 0.750"
    )
    with pytest.raises(BudgetError) as info:
        allocate(gm, budget=0.5, other_flops=0)
    assert str(info.value).startswith(want)
    # without exact nodes the message names none
    with pytest.raises(BudgetError) as info:
        allocate(_graph({"a": (1000, ((0.25, 0.3),))}), budget=0.2, other_flops=0)
    assert "(0.0000 of it cannot be sampled at all); the smallest feasible budget is 0.250" in str(info.value)


def test_a_curve_with_five_points_keeps_its_whole_convex_hull() -> None:
    # Forward FLOPs only, 1 per kept column of 100; dense 200, budget 0.45 -> 90.
    #   a: 0.8 -> 80 (0.010), 0.6 -> 60 (0.030), 0.4 -> 40 (0.060), 0.2 -> 20 (0.095)
    #      steps cost 0.0005, 0.001, 0.0015, 0.00175 per FLOP saved: all five on the hull
    #   b: 0.6 -> 60 (0.010), 0.5 -> 50 (0.027): 0.00025, then 0.0017 per FLOP
    # The walk: b .6, a .8, a .6, a .4 (100 left > 90), b .5 -> 90: a .4 + b .5 = 0.087, the
    # least of every pair that fits (a .2 + b .6 = 0.105, a .2 + b .5 = 0.122). A hull that
    # lost a's 0.4 point would jump a from .6 to .2 (80) and leave 10 FLOPs nothing fits in.
    gm = _graph(
        {
            "a": (100, ((0.8, 0.01), (0.6, 0.03), (0.4, 0.06), (0.2, 0.095))),
            "b": (100, ((0.6, 0.01), (0.5, 0.027))),
        },
        forward_only=True,
    )
    allocate(gm, budget=0.45, other_flops=0)
    plans = _plans(gm)
    assert (plans["a"].keep, plans["a"].k, plans["b"].keep, plans["b"].k) == (0.4, 40, 0.5, 50)


def test_a_tie_for_the_leftover_goes_to_the_first_node_in_graph_order() -> None:
    # Plans must not depend on anything but the graph: equal gains are settled by node order.
    # a and b alike, forward FLOPs only (1 per kept column): 0.5 -> 50 (0.10), 0.3 -> 30
    # (0.30), and 0.35 -> 35 (0.28) off the hull (0.25 on the line from 50 to 30).
    # Budget 0.325 of 200 = 65: the walk takes both to 0.5, then both to 0.3 -> 60. The 5
    # left buy one move back to 0.35 (0.02 per 5 FLOPs for either): a's, the first.
    curve = ((0.5, 0.1), (0.35, 0.28), (0.3, 0.3))
    gm = _graph({"a": (100, curve), "b": (100, curve)}, forward_only=True)
    allocate(gm, budget=0.325, other_flops=0)
    plans = _plans(gm)
    assert (plans["a"].keep, plans["a"].k, plans["b"].keep, plans["b"].k) == (0.35, 35, 0.3, 30)


def _least_error(curves: dict, budget: float) -> float:
    """The least summed error over every combination that fits (forward FLOPs only, 1 per column)."""
    options = {n: [(100, 0.0)] + [(round(k * 100), e) for k, e in c[1]] for n, c in curves.items()}
    fits = [
        sum(e for _, e in combo)
        for combo in itertools.product(*options.values())
        if sum(c for c, _ in combo) <= budget * 100 * len(curves)
    ]
    return min(fits)


def test_the_walk_stops_once_the_budget_holds() -> None:
    # Three nodes, dense 100 each, budget 0.76 -> 228 (found by a random search as a case
    # where cutting on below the budget and buying back with the leftover ends worse).
    curves = {
        "a": (100, ((0.8, 0.395), (0.4, 0.458))),
        "b": (100, ((0.9, 0.378), (0.6, 0.54), (0.3, 0.724))),
        "c": (100, ((0.7, 0.617), (0.5, 0.671), (0.3, 0.724))),
    }
    gm = _graph(curves, forward_only=True)
    allocate(gm, budget=0.76, other_flops=0)
    plans = _plans(gm)
    assert sum(p.est_error for p in plans.values()) == pytest.approx(_least_error(curves, 0.76))
    assert sum(p.k for p in plans.values()) <= 228


def test_the_leftover_goes_by_error_reduction_per_flop() -> None:
    # Forward FLOPs only, 1 per kept column; dense 400, budget 0.8475 -> 339.
    #   a: 0.5 -> 50 (0.300)  b: 0.9 -> 90 (0.040)  c: 0.8 -> 80 (0.060)  d: 0.9 -> 90 (0.035)
    # per FLOP saved: c 0.003, d 0.0035, b 0.004, a 0.006: the walk cuts all four -> 310.
    # 29 left: b back (+10, 0.004 per FLOP), then d (+10, 0.0035) -> 330; c back (+20) no
    # longer fits. Summed error a + c = 0.36, the least of all that fit (brute force below);
    # taking c back first (the largest single gain, 0.06) would leave a + b + d = 0.375.
    curves = {
        "a": (100, ((0.5, 0.3),)),
        "b": (100, ((0.9, 0.04),)),
        "c": (100, ((0.8, 0.06),)),
        "d": (100, ((0.9, 0.035),)),
    }
    gm = _graph(curves, forward_only=True)
    allocate(gm, budget=0.8475, other_flops=0)
    plans = _plans(gm)
    assert {n: p.keep for n, p in plans.items()} == {"a": 0.5, "b": 1.0, "c": 0.8, "d": 1.0}
    assert sum(p.est_error for p in plans.values()) == pytest.approx(_least_error(curves, 0.8475))


def test_steps_are_ranked_by_error_over_the_flops_they_save() -> None:
    # Three nodes, dense 100 each, budget 0.64 -> 192 (found by a random search as a case
    # where ranking a step by its error over the ratio of the costs, not their difference,
    # ends 0.795 instead of the least summed error 0.521).
    curves = {
        "a": (100, ((0.9, 0.074), (0.3, 0.487))),
        "b": (100, ((0.9, 0.086), (0.6, 0.224), (0.1, 0.382))),
        "c": (100, ((0.9, 0.065), (0.8, 0.529), (0.2, 0.571))),
    }
    gm = _graph(curves, forward_only=True)
    allocate(gm, budget=0.64, other_flops=0)
    plans = _plans(gm)
    assert sum(p.est_error for p in plans.values()) == pytest.approx(_least_error(curves, 0.64))
    assert sum(p.k for p in plans.values()) <= 192
