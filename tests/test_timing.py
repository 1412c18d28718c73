"""Measured timing (ApproxConfig(measure_time=True)) and hardware-aligned kept counts."""

from __future__ import annotations

import pytest
import torch

import approxcompile
from approxcompile import ApproxConfig, BudgetError
from approxcompile.plan import META_KEY, Flops, NodePlan, aligned_count
from approxcompile.report import Report
from tests.models import MLP, mlp


def _plan(timing: tuple[tuple[float, float], ...]) -> NodePlan:
    return NodePlan(
        name="fc", kind="linear", op="Linear", shapes=((8, 64), (64, 64)), out_shape=(8, 64), inner=64,
        flops=Flops(100, 100, 100), sensitivity=((0.5, 0.1), (0.25, 0.3)), timing=timing,
    )  # fmt: skip


def test_saves_time_reads_the_measured_timing() -> None:
    p = _plan(((1.0, 2e-3), (0.5, 1e-3), (0.25, 3e-3)))
    assert p.saves_time(0.5) and not p.saves_time(0.25)
    assert _plan(()).saves_time(0.25)  # nothing measured: FLOPs decide


def test_timing_survives_the_json_round_trip() -> None:
    from approxcompile.plan import Plan

    plan = Plan(budget=0.5, method="topk", nodes=(_plan(((1.0, 2e-3), (0.5, 1e-3))),), other_flops=0)
    again = Report.from_dict(Report(plan).to_dict()).plan
    assert again.nodes[0].timing == ((1.0, 2e-3), (0.5, 1e-3))


def test_tiny_layers_are_not_sampled_when_time_is_measured() -> None:
    # Batch 2 of 128-wide layers: the dense GEMMs take microseconds, the sampling overhead
    # (norms, top-k, gathers, scatters) several times more, so nothing may be sampled.
    model = MLP((64, 128, 128, 128, 10))
    x = torch.randn(2, 64)
    plain = approxcompile.optimize(model, 0.6, example_inputs=(x,))
    assert approxcompile.report(plain).sampled  # by FLOPs alone, sampling looks worthwhile
    config = ApproxConfig(measure_time=True, time_repeats=5)
    with pytest.raises(BudgetError, match="smallest feasible budget is 1.000"):
        approxcompile.optimize(model, 0.6, example_inputs=(x,), config=config)
    timed = approxcompile.optimize(model, 1.0, example_inputs=(x,), config=config)
    middle = [n for n in approxcompile.report(timed).nodes if n.timing]
    assert middle and all(not n.sampled for n in middle)
    assert all("measured no faster than the dense op" in (n.reason or "") for n in middle)
    assert all(n.timing[0][0] == 1.0 and len(n.timing) == len(n.sensitivity) + 1 for n in middle)


@pytest.mark.parametrize(
    ("keep", "n", "align", "k"),
    [(0.35, 4096, 8, 1432), (0.35, 4096, 1, 1434), (0.2, 128, 8, 24), (0.05, 128, 8, 8), (0.3, 32, 8, 10)],
)
def test_aligned_count(keep: float, n: int, align: int, k: int) -> None:
    assert aligned_count(keep, n, align) == k


def test_allocation_picks_aligned_counts() -> None:
    x = torch.randn(16, 64)
    fast = approxcompile.optimize(mlp(), 0.4, example_inputs=(x,))  # inner dims 128 >= 8 * 8
    sampled = approxcompile.report(fast).sampled
    assert sampled and all(n.k % 8 == 0 and n.keep == n.k / n.inner for n in sampled)
    loose = approxcompile.optimize(mlp(), 0.4, example_inputs=(x,), config=ApproxConfig(align=1))
    assert any(n.k % 8 for n in approxcompile.report(loose).sampled)
    for node in fast.graph.nodes:
        if META_KEY in node.meta and node.meta[META_KEY].sampled:
            assert node.kwargs["keep"] == node.meta[META_KEY].keep
