"""The budget allocation: hull walk, then the leftover budget spent on the best error per FLOP."""

from __future__ import annotations

import torch
from approxcompile.passes.select import _spend_leftover

import approxcompile
from tests.models import mlp


def test_leftover_goes_to_the_best_error_reduction_per_flop() -> None:
    chosen = {"a": (100, 0.5, 0.2), "b": (100, 0.5, 0.2)}
    admissible = {
        "a": [(1000, 0.0, 1.0), (100, 0.5, 0.2), (150, 0.3, 0.3)],  # 0.2 error for 50 FLOPs
        "b": [(1000, 0.0, 1.0), (100, 0.5, 0.2), (130, 0.45, 0.25)],  # 0.05 for 30
    }
    assert _spend_leftover(chosen, admissible, leftover=60) == 50
    assert chosen == {"a": (150, 0.3, 0.3), "b": (100, 0.5, 0.2)}  # b's step no longer fits
    assert _spend_leftover(chosen, admissible, leftover=10) == 0


def test_the_plan_spends_the_budget_it_is_given() -> None:
    x = torch.randn(16, 64)
    for budget in (0.3, 0.4, 0.6):
        plan = approxcompile.report(approxcompile.optimize(mlp(), budget, example_inputs=(x,))).plan
        assert budget - 0.05 <= plan.fraction <= budget + 1e-9, (budget, plan.fraction)
