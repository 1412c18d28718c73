"""Measured timing (ApproxConfig(measure_time=True)) and hardware-aligned kept counts."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import approxcompile
from approxcompile import ApproxConfig, BudgetError
from approxcompile.plan import META_KEY, Flops, NodePlan, aligned_count, conv_align
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


def _fake_clock(sampled_seconds: float) -> Callable[..., float]:
    """A clock that runs each step once for real and reports 1 ms dense, ``sampled_seconds`` sampled.

    Wall-clock timings depend on the machine and its load; the tests check what the
    pipeline does with timings, not the machine.
    """

    def clock(step: Callable[[float, bool], None], keep: float, training: bool, repeats: int) -> float:
        step(keep, training)
        return sampled_seconds if training else 1e-3

    return clock


def test_nodes_measured_slower_than_dense_stay_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("approxcompile.passes.timing._time_step", _fake_clock(2e-3))
    x = torch.randn(16, 64)
    assert approxcompile.report(approxcompile.optimize(mlp(), 0.6, example_inputs=(x,))).sampled
    config = ApproxConfig(measure_time=True)
    with pytest.raises(BudgetError, match="smallest feasible budget is 1.000"):
        approxcompile.optimize(mlp(), 0.6, example_inputs=(x,), config=config)
    timed = approxcompile.optimize(mlp(), 1.0, example_inputs=(x,), config=config)
    middle = [n for n in approxcompile.report(timed).nodes if n.timing]
    assert len(middle) == 2 and all(not n.sampled for n in middle)
    assert all("measured no faster than the dense op (1.00 ms)" in (n.reason or "") for n in middle)
    assert all(n.timing[0] == (1.0, 1e-3) and len(n.timing) == len(n.sensitivity) + 1 for n in middle)


def test_nodes_measured_faster_are_sampled_as_usual(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("approxcompile.passes.timing._time_step", _fake_clock(0.5e-3))
    x = torch.randn(16, 64)
    plain = approxcompile.report(approxcompile.optimize(mlp(), 0.6, example_inputs=(x,)))
    timed = approxcompile.report(
        approxcompile.optimize(mlp(), 0.6, example_inputs=(x,), config=ApproxConfig(measure_time=True))
    )
    assert [(n.name, n.k) for n in timed.sampled] == [(n.name, n.k) for n in plain.sampled]
    assert all(n.timing for n in timed.sampled)


def test_the_real_clock_times_every_keep_ratio() -> None:
    x = torch.randn(4, 64)
    config = ApproxConfig(measure_time=True, time_repeats=1, keep_grid=(0.5, 0.25))
    rep = approxcompile.report(approxcompile.optimize(MLP(), 1.0, example_inputs=(x,), config=config))
    timed = [n for n in rep.nodes if n.timing]
    assert timed and all([k for k, _ in n.timing] == [1.0, 0.5, 0.25] for n in timed)
    assert all(t > 0 for n in timed for _, t in n.timing)


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


def test_conv_counts_align_to_the_cpu_channel_block() -> None:
    """oneDNN pads a CPU convolution's channels to whole blocks (16 with AVX-512): plans keep whole blocks."""
    block = 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8
    assert conv_align(8, "cpu") == block and conv_align(1, "cpu") == 1 and conv_align(8, "cuda") == 8
    assert conv_align(3, "cpu") == 3 * block  # a user's own multiple is kept too
    torch.manual_seed(0)  # with align 8 alone, this model's budget-0.35 plan keeps 40 channels
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 128, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(128, 128, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(128, 128, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(128, 10, 1),
    )
    x = torch.randn(2, 3, 8, 8)
    sampled = approxcompile.report(approxcompile.optimize(model, 0.35, example_inputs=(x,))).sampled
    assert sampled and all(n.kind == "conv" and n.k % block == 0 for n in sampled)
