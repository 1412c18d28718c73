"""The budget allocation picks the keep ratios that minimise the summed error, checked by hand.

Two nodes with made-up (cost, error) curves, so the optimum can be found on paper and by
trying every combination; the allocation runs through the public pass on a real graph.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from approxcompile.errors import BudgetError
from approxcompile.passes import allocate
from approxcompile.plan import META_KEY, Flops
from tests.plans import linear_plan


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(100, 100), nn.Linear(100, 100)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def _graph(curves: dict[str, tuple[int, tuple[tuple[float, float], ...]]]) -> torch.fx.GraphModule:
    """``a`` and ``b`` with forward FLOPs ``f`` (3·f dense) and the given (keep, error) curves."""
    gm = torch.fx.symbolic_trace(Two())
    for node in gm.graph.nodes:
        if node.op == "call_module":
            f, sensitivity = curves[node.target]
            plan = linear_plan(node.target, 1, 100, 100, flops=Flops(f, f, f), sensitivity=sensitivity)
            node.meta[META_KEY] = plan
    return gm


def _decided(gm: torch.fx.GraphModule) -> dict[str, tuple[float, int]]:
    return {
        n.target: (n.meta[META_KEY].keep, n.meta[META_KEY].k) for n in gm.graph.nodes if META_KEY in n.meta
    }


# a: dense 3000; keep 0.75 -> 2250 (err 0.02), 0.5 -> 1500 (0.05), 0.25 -> 750 (0.30)
# b: dense 6000; keep 0.75 -> 4500 (0.10), 0.5 -> 3000 (0.25), 0.25 -> 1500 (0.60)
# budget 0.5 of 9000 = 4500. Every pair within it, by hand:
#   a 1 + b .25 = 4500 (0.60)   a .75 + b .25 = 3750 (0.62)   a .5 + b .5 = 4500 (0.30)
#   a .5 + b .25 = 3000 (0.65)  a .25 + b .5 = 3750 (0.55)    a .25 + b .25 = 2250 (0.90)
# The optimum is a 0.5, b 0.5. Cutting the node with the worst error per FLOP first (b, whose
# every step costs more error than a's) ends at a 1, b 0.25 (0.60).
CONVEX = {
    "a": (1000, ((0.75, 0.02), (0.5, 0.05), (0.25, 0.30))),
    "b": (2000, ((0.75, 0.10), (0.5, 0.25), (0.25, 0.60))),
}

# a: dense 3000; 0.5 -> 1500 (0.10), 0.25 -> 750 (0.50)
# b: dense 3000; 0.5 -> 1500 (0.30), 0.25 -> 750 (0.35): b's 0.5 is off its convex hull
# budget 0.5 of 6000 = 3000: a .5 + b .5 = 3000 (0.40) beats a .5 + b .25 = 2250 (0.45),
# a .25 + b .5 = 2250 (0.80) and a .25 + b .25 = 1500 (0.85); a or b dense does not fit.
# The hull walk stops at a .5 + b .25; the 750 FLOPs left take b back to 0.5.
OFF_HULL = {
    "a": (1000, ((0.5, 0.10), (0.25, 0.50))),
    "b": (1000, ((0.5, 0.30), (0.25, 0.35))),
}

# a: dense 3000; 0.5 -> 1500 (0.20), 0.25 -> 750 (0.70)
# b: dense 3000; 0.5 -> 1500 (0.30), 0.25 -> 750 (0.35): b's 0.5 is off its convex hull
# budget 0.625 of 6000 = 3750. By hand: a 1 + b .25 = 3750 (0.35) beats a .5 + b .5 = 3000
# (0.50), a .5 + b .25 = 2250 (0.55) and a .25 + b 1 = 3750 (0.70). Walking b through its
# off-hull 0.5 would stop at a .5 + b .5, and the 750 left could not undo it.
HULL_MATTERS = {
    "a": (1000, ((0.5, 0.20), (0.25, 0.70))),
    "b": (1000, ((0.5, 0.30), (0.25, 0.35))),
}

# a: dense 3000; 0.5 -> 1500 (0.30), 0.25 -> 750 (0.35)
# b: dense 3000; 0.5 -> 1500 (0.08), 0.25 -> 750 (0.15)
# budget 0.375 of 6000 = 2250: a .25 + b .5 = 2250 (0.43) beats a .5 + b .25 = 2250 (0.45)
# and a .25 + b .25 = 1500 (0.50). The hull walk ends at a .25 + b .25; of the two ways to
# spend the 750 left, b back to 0.5 gains 0.07, a back to 0.5 only 0.05.
LEFTOVER = {
    "a": (1000, ((0.5, 0.30), (0.25, 0.35))),
    "b": (1000, ((0.5, 0.08), (0.25, 0.15))),
}


def _brute_force(curves: dict, budget: float) -> tuple[float, dict[str, float]]:
    """The least summed error over every combination of options that fits (a second reference)."""
    options = {
        name: [(3 * f, 0.0, 1.0)] + [(3 * f * round(k * 100) // 100, e, k) for k, e in sens]
        for name, (f, sens) in curves.items()
    }
    dense = sum(3 * f for f, _ in curves.values())
    best: tuple[float, dict[str, float]] = (float("inf"), {})
    for combo in itertools.product(*options.values()):
        if sum(c for c, _, _ in combo) <= budget * dense and sum(e for _, e, _ in combo) < best[0]:
            best = (sum(e for _, e, _ in combo), {n: k for n, (_, _, k) in zip(options, combo, strict=True)})
    return best


@pytest.mark.parametrize(
    ("curves", "budget", "want", "fraction"),
    [
        (CONVEX, 0.5, {"a": (0.5, 50), "b": (0.5, 50)}, 0.5),
        (OFF_HULL, 0.5, {"a": (0.5, 50), "b": (0.5, 50)}, 0.5),
        (CONVEX, 0.75, {"a": (0.75, 75), "b": (0.75, 75)}, 0.75),  # 2250 + 4500 (0.12)
        (CONVEX, 0.25, {"a": (0.25, 25), "b": (0.25, 25)}, 0.25),  # the only fit
        (HULL_MATTERS, 0.625, {"a": (1.0, 100), "b": (0.25, 25)}, 0.625),
        (LEFTOVER, 0.375, {"a": (0.25, 25), "b": (0.5, 50)}, 0.375),
    ],
)
def test_allocation_finds_the_least_summed_error(
    curves: dict, budget: float, want: dict, fraction: float
) -> None:
    gm = _graph(curves)
    result = allocate(gm, budget=budget, other_flops=0)
    assert _decided(gm) == want
    assert result.stats["fraction"] == pytest.approx(fraction)
    assert result.stats["sampled"] == sum(k < 1.0 for k, _ in want.values())
    assert _brute_force(curves, budget)[1] == {n: k for n, (k, _) in want.items()}


def test_other_flops_count_in_the_budget() -> None:
    # 9000 in the nodes + 3000 elsewhere; budget 0.625 of 12000 = 7500 leaves 4500 for the
    # nodes: the same optimum as CONVEX at 0.5.
    gm = _graph(CONVEX)
    result = allocate(gm, budget=0.625, other_flops=3000)
    assert _decided(gm) == {"a": (0.5, 50), "b": (0.5, 50)}
    assert result.stats["fraction"] == pytest.approx(7500 / 12000)


def test_a_node_the_budget_does_not_need_stays_exact_with_a_reason() -> None:
    gm = _graph(CONVEX)
    # 8100 of 9000: a at 0.75 is 8250 (too much), a at 0.5 is 7500 and b stays dense; the 600
    # left buy nothing (a back to 0.75 costs 750)
    allocate(gm, budget=0.9, other_flops=0)
    plans = {n.target: n.meta[META_KEY] for n in gm.graph.nodes if META_KEY in n.meta}
    assert (plans["a"].keep, plans["a"].k) == (0.5, 50)
    assert plans["b"].k == 100 and plans["b"].reason == "budget is met without sampling this node"


def test_an_infeasible_budget_names_the_smallest_feasible_one() -> None:
    with pytest.raises(BudgetError, match=r"smallest feasible budget is 0\.250"):
        allocate(_graph(CONVEX), budget=0.1, other_flops=0)


class Four(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (
            nn.Linear(8, 32),
            nn.Linear(32, 32),
            nn.Linear(32, 32),
            nn.Linear(32, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


def test_every_exclusion_names_its_reason() -> None:
    import approxcompile
    from approxcompile import ApproxConfig, NodeOverride

    config = (
        ApproxConfig(exclude_first_last=False)
        .set_module_name("b", NodeOverride(min_k=32))
        .set_module_name("c", NodeOverride(keep=0.99))  # 0.99 x 32 = 31.68: k rounds to 32 = n
        .set_module_name("d", NodeOverride(keep=0.5))
    )
    torch.manual_seed(0)
    fast = approxcompile.optimize(Four(), 0.99, example_inputs=(torch.randn(16, 8),), config=config)
    plans = {p.name: p for p in approxcompile.report(fast).nodes}
    assert plans["a"].reason == "inner dimension 8 is too small to sample (min_inner=16)"
    assert plans["b"].reason == "inner dimension 32 is not above min_k=32"
    assert plans["c"].reason == "fixed keep rounds to k = n"
    assert (plans["d"].keep, plans["d"].k, plans["d"].reason) == (0.5, 16, None)
    assert plans["d"].settings_source == "module_name 'd'" and plans["a"].settings_source == "global"


def test_a_keep_ratio_measured_slower_than_dense_is_never_chosen() -> None:
    # a's only option (0.5, error 0.05) measured 2 ms against 1 ms dense: a stays exact, and
    # the budget (3750 of 6000) is met by b alone at 0.25
    gm = _graph({"a": (1000, ((0.5, 0.05),)), "b": (1000, ((0.5, 0.30), (0.25, 0.50)))})
    a = next(n for n in gm.graph.nodes if n.target == "a")
    a.meta[META_KEY] = a.meta[META_KEY].with_(timing=((1.0, 1e-3), (0.5, 2e-3)))
    allocate(gm, budget=0.625, other_flops=0)
    plans = {n.target: n.meta[META_KEY] for n in gm.graph.nodes if META_KEY in n.meta}
    assert plans["a"].reason == "sampling measured no faster than the dense op (1.00 ms) at any keep ratio"
    assert (plans["b"].keep, plans["b"].k) == (0.25, 25)
