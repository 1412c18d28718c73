"""Backward mode with separate keep ratios for dX (``keep``) and dW (``row_keep``).

The ops take both, the cost model measures an error curve and counts FLOPs for each product
and allocates them under one budget, overrides pin either, and plans round-trip.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import approxcompile
from approxcompile import ApproxConfig, NodeOverride, ops
from approxcompile.export import ExportError, lower_for_export
from approxcompile.ops.backward import backward_sampled_conv, backward_sampled_linear
from approxcompile.passes import allocate, measure_step_flops
from approxcompile.plan import META_KEY, Flops, NodePlan
from tests.test_backward import _bias_check

G = torch.Generator().manual_seed(7)
X = torch.randn(48, 32, generator=G) * torch.linspace(0.1, 3, 48)[:, None]
W = torch.randn(40, 32, generator=G) * torch.linspace(0.2, 2, 40)[:, None]
DY = torch.randn(48, 40, generator=G)
CX = torch.randn(12, 4, 6, 6, generator=G)
CW = torch.randn(8, 4, 3, 3, generator=G)
CDY = torch.randn(12, 8, 4, 4, generator=G)


def _linear(keep: float, row_keep: float, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    x, w = X.clone().requires_grad_(), W.clone().requires_grad_()
    backward_sampled_linear(x, w, keep=keep, row_keep=row_keep, **kw).backward(DY)
    return x.grad, w.grad


def _conv(keep: float, row_keep: float, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    x, w = CX.clone().requires_grad_(), CW.clone().requires_grad_()
    backward_sampled_conv(x, w, None, 1, 0, 1, keep=keep, row_keep=row_keep, **kw).backward(CDY)
    return x.grad, w.grad


@pytest.mark.parametrize("grads", [_linear, _conv])
def test_a_ratio_of_one_makes_that_product_exact_and_the_other_sampled(grads) -> None:
    exact = grads(1.0, 1.0)
    g = torch.Generator().manual_seed(0)
    dx, dw = grads(1.0, 0.25, generator=g)  # dX exact, dW over a quarter of the rows
    assert torch.allclose(dx, exact[0], atol=1e-5) and not torch.allclose(dw, exact[1], atol=1e-3)
    dx, dw = grads(0.25, 1.0, generator=g)  # dX over a quarter of the outputs, dW exact
    assert torch.allclose(dw, exact[1], atol=1e-4) and not torch.allclose(dx, exact[0], atol=1e-3)


@pytest.mark.parametrize("grads", [_linear, _conv])
def test_each_product_is_unbiased_at_its_own_ratio(grads) -> None:
    """400 draws at keep 0.5 / row_keep 0.2: each mean misses by about sum(var)/N (allow 3x)."""
    exact = grads(1.0, 1.0)
    g = torch.Generator().manual_seed(1)
    draws = [grads(0.5, 0.2, method="bernoulli", generator=g) for _ in range(400)]
    for which in (0, 1):
        sq_err, floor = _bias_check([d[which] for d in draws], exact[which])
        assert 0 < sq_err < 3 * floor, (which, sq_err, floor)


def test_the_ratios_reach_the_custom_op_and_its_flop_formula() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    x, w = X.clone().requires_grad_(), W.clone().requires_grad_()
    y = backward_sampled_linear(x, w, keep=0.5, row_keep=0.25, method="crs")
    with FlopCounterMode(display=False) as counter:
        y.backward(DY)
    # dX over 20 of 40 outputs, dW over 12 of 48 rows (crs keeps exactly k)
    assert counter.get_total_flops() == 2 * 48 * 20 * 32 + 2 * 12 * 32 * 40


def _skewed() -> tuple[nn.Module, torch.Tensor]:
    """A case where dW is cheap to sample and dX is not.

    16 of 256 batch rows carry almost all of ``|X[b]|``, so a few rows give dW nearly
    exactly; the 64 output features of dX are all alike, so dropping any of them costs error.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    x[16:] *= 0.02
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)), x.requires_grad_()


CFG = ApproxConfig(mode="backward", method="crs", exclude_first_last=False)


def test_the_cost_model_gives_dx_and_dw_different_ratios_where_they_differ() -> None:
    model, x = _skewed()
    fast = approxcompile.optimize(model, 0.7, example_inputs=(x,), config=CFG)
    plan = fast.meta[META_KEY]
    first = plan.nodes[0]
    assert first.split and first.sampled
    # dW's measured error stays tiny down to small ratios, dX's does not: dW is cut far deeper
    assert dict(first.row_sensitivity)[0.2] < 0.5 < 1.0 < dict(first.sensitivity)[0.75]
    assert first.row_keep is not None and first.row_keep < first.keep
    assert first.row_k < first.rows
    # FLOPs: each product at its own count, as FlopCounterMode sees the rewritten step
    approx = first.approx_flops
    assert approx.input_grad == first.flops.input_grad * first.k // first.inner
    assert approx.weight_grad == first.flops.weight_grad * first.row_k // first.rows
    fast.train()
    assert plan.counted_flops == measure_step_flops(fast, (x,))
    assert plan.fraction <= 0.7 + 1e-9
    calls = {n.kwargs["row_keep"] for n in fast.graph.nodes if n.target is ops.backward_sampled_linear}
    assert first.row_keep in calls
    table = str(approxcompile.report(fast))
    assert f"dW {first.row_keep:.2f}" in table and f"dW {first.row_k}/{first.rows}" in table


def _plan(sens: tuple, row_sens: tuple) -> NodePlan:
    return NodePlan(
        name="fc", kind="linear", op="Linear", shapes=((100, 10), (10, 10)), out_shape=(100, 10),
        inner=10, rows=100, flops=Flops(1000, 1000, 1000), mode="backward", row_keep=1.0,
        method="crs", sensitivity=sens, row_sensitivity=row_sens,
    )  # fmt: skip


def _allocated(plan: NodePlan, budget: float) -> NodePlan:
    import torch.fx as fx

    graph = fx.Graph()
    node = graph.placeholder("fc")
    graph.output(None)
    node.meta[META_KEY] = plan
    allocate(fx.GraphModule(nn.Module(), graph), budget=budget, other_flops=0)
    return node.meta[META_KEY]


def test_the_allocation_follows_each_products_own_curve() -> None:
    grid = (0.8, 0.5, 0.2)
    flat, steep = tuple((r, 0.01 * (1 - r)) for r in grid), tuple((r, 5.0 * (1 - r)) for r in grid)
    # budget 0.6 of 3000: 1800 = forward 1000 + 800 for the two gradients (no overhead here)
    a = _allocated(_plan(steep, flat), 0.6)
    assert (a.keep, a.row_keep) == (0.5, 0.2)  # dW (flat curve) gives up most
    b = _allocated(_plan(flat, steep), 0.6)
    assert (b.keep, b.row_keep) == (0.2, 0.5)  # the mirror case: dX gives up most
    assert a.cost() == b.cost() == 1000 + 500 + 200 <= 1800
    assert a.est_error == pytest.approx(5.0 * 0.5 + 0.01 * 0.8)


def test_overrides_pin_either_ratio() -> None:
    model, x = _skewed()
    pinned = CFG.set_module_name("0", NodeOverride(row_keep=0.5))
    first = approxcompile.optimize(model, 0.8, example_inputs=(x,), config=pinned).meta[META_KEY].nodes[0]
    assert (first.row_fixed_keep, first.row_keep, first.fixed_keep) == (0.5, 0.5, None)
    both = CFG.set_module_name("0", NodeOverride(keep=0.5))  # keep alone pins both products
    first = approxcompile.optimize(model, 0.8, example_inputs=(x,), config=both).meta[META_KEY].nodes[0]
    assert (first.keep, first.row_keep) == (0.5, 0.5)
    with pytest.raises(ValueError, match="NodeOverride.row_keep"):
        NodeOverride(row_keep=1.5)


def test_a_saved_plan_reapplies_both_ratios_and_the_export_refuses(tmp_path) -> None:
    model, x = _skewed()
    fast = approxcompile.optimize(model, 0.7, example_inputs=(x,), config=CFG)
    path = approxcompile.save_plan(fast, tmp_path / "plan.json")
    again = approxcompile.optimize(model, example_inputs=(x,), plan=path)
    before, after = fast.meta[META_KEY].nodes, again.meta[META_KEY].nodes
    assert [(n.keep, n.row_keep, n.row_sensitivity) for n in before] == [
        (n.keep, n.row_keep, n.row_sensitivity) for n in after
    ]
    kwargs = [str(n.kwargs) for n in again.graph.nodes if n.target is ops.backward_sampled_linear]
    assert kwargs == [str(n.kwargs) for n in fast.graph.nodes if n.target is ops.backward_sampled_linear]
    assert any("'row_keep': 0.2" in k for k in kwargs), kwargs
    with pytest.raises(ExportError, match="backward mode"):
        lower_for_export(again)


def test_set_budget_moves_both_ratios_in_the_graph() -> None:
    model, x = _skewed()
    fast = approxcompile.optimize(model, 0.8, example_inputs=(x,), config=CFG)
    plan = approxcompile.set_budget(fast, 0.5)
    assert plan.fraction <= 0.5 + 1e-9
    calls = {n.name: n.kwargs for n in fast.graph.nodes if n.target is ops.backward_sampled_linear}
    assert len(calls) == 2
    for node, kwargs in zip(plan.nodes, calls.values(), strict=True):
        assert (kwargs["keep"], kwargs["row_keep"]) == (node.keep, node.row_keep)
    assert any(n.row_k < n.rows for n in plan.nodes)
