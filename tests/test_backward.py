"""Backward sampling: exact forward, unbiased dX and dW, only requested gradients, less saved memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import approxcompile
from approxcompile import ApproxConfig, NodeOverride, ops
from approxcompile.ops import backward as backward_mod
from approxcompile.ops.backward import backward_sampled_conv, backward_sampled_linear
from approxcompile.passes import measure_step_flops
from approxcompile.plan import META_KEY, kept_count
from tests.models import cnn, mlp

UNBIASED = ("bernoulli", "crs", "uniform")
G = torch.Generator().manual_seed(0)
X = torch.randn(48, 32, generator=G) * torch.linspace(0.1, 3, 48)[:, None]  # uneven row norms
W = torch.randn(40, 32, generator=G) * torch.linspace(0.2, 2, 40)[:, None]  # uneven feature norms
B = torch.randn(40, generator=G)
DY = torch.randn(48, 40, generator=G)
DX_EXACT, DW_EXACT = DY @ W, DY.t() @ X


def _grads(keep: float, **kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, w, b = X.clone().requires_grad_(), W.clone().requires_grad_(), B.clone().requires_grad_()
    y = backward_sampled_linear(x, w, b, keep=keep, **kw)
    y.backward(DY)
    return x.grad, w.grad, b.grad


def _bias_check(draws: list[torch.Tensor], exact: torch.Tensor) -> tuple[float, float]:
    """(|mean - exact|^2, sum(var)/N): the first has expectation the second when unbiased."""
    s = torch.stack(draws)
    return float((s.mean(0) - exact).pow(2).sum()), float(s.var(0).sum()) / len(draws)


def test_forward_is_exact_and_eval_is_exact() -> None:
    y = backward_sampled_linear(X.clone().requires_grad_(), W, B, keep=0.25)
    assert torch.equal(y, F.linear(X, W, B))
    dx, dw, db = _grads(0.25, training=False)
    assert torch.allclose(dx, DX_EXACT, atol=1e-5) and torch.allclose(dw, DW_EXACT, atol=1e-4)
    assert torch.allclose(db, DY.sum(0))


@pytest.mark.parametrize(
    ("method", "row_scores"),
    [("bernoulli", "x_dy"), ("bernoulli", "x"), ("crs", "x_dy"), ("uniform", "x")],
)
def test_input_and_weight_gradients_are_unbiased(method: str, row_scores: str) -> None:
    """500 draws, fixed seed; an unbiased mean misses by sum(var)/N in expectation: allow 3x.

    Hundreds of entries make the ratio concentrate near 1 (see the biased control below).
    """
    g = torch.Generator().manual_seed(1234)
    draws = [_grads(0.25, method=method, row_scores=row_scores, generator=g) for _ in range(500)]
    for which, exact in ((0, DX_EXACT), (1, DW_EXACT)):
        sq_err, floor = _bias_check([d[which] for d in draws], exact)
        assert sq_err < 3.0 * floor, (which, sq_err, floor)
        assert floor > 0  # it really sampled
    assert all(torch.allclose(d[2], DY.sum(0)) for d in draws[:5])  # bias gradient stays exact


def test_the_unbiasedness_check_catches_a_biased_estimator(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same check on bernoulli with its 1/p rescaling dropped (a plausible bug) fails."""
    unbiased = backward_mod.sample_pairs
    monkeypatch.setattr(backward_mod, "sample_pairs", lambda *a, **kw: (unbiased(*a, **kw)[0], None))
    g = torch.Generator().manual_seed(1234)
    draws = [_grads(0.25, method="bernoulli", generator=g) for _ in range(300)]
    for which, exact in ((0, DX_EXACT), (1, DW_EXACT)):
        sq_err, floor = _bias_check([d[which] for d in draws], exact)
        assert sq_err > 3.0 * floor, (which, sq_err, floor)


def _product_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def test_only_the_requested_gradients_are_computed() -> None:
    m, n, p, keep = X.shape[0], X.shape[1], W.shape[0], 0.25
    fwd = 2 * m * n * p

    def step(x_grad: bool, w_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x, w = X.clone().requires_grad_(x_grad), W.clone().requires_grad_(w_grad)
        backward_sampled_linear(x, w, keep=keep, method="uniform").backward(DY)
        return x, w

    x, w = step(False, True)
    assert x.grad is None and w.grad is not None
    assert _product_flops(lambda: step(False, True)) == fwd + 2 * kept_count(keep, m) * n * p
    x, w = step(True, False)
    assert x.grad is not None and w.grad is None
    assert _product_flops(lambda: step(True, False)) == fwd + 2 * m * n * kept_count(keep, p)


def _saved_bytes(fn, weight: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward, the weight (and views of it) excluded."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr():
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_row_scores_x_saves_only_the_sampled_rows() -> None:
    x, w = torch.randn(512, 64).requires_grad_(), torch.nn.Parameter(torch.randn(64, 64))
    exact = _saved_bytes(lambda: F.linear(x, w), w)
    full = _saved_bytes(lambda: backward_sampled_linear(x, w, keep=0.25, method="uniform"), w)
    rows = _saved_bytes(lambda: backward_sampled_linear(x, w, keep=0.25, method="uniform", row_scores="x"), w)
    assert exact == full == 512 * 64 * 4  # x_dy needs dY to score rows, so all of X is kept
    kept = kept_count(0.25, 512)
    assert rows <= kept * 64 * 4 + kept * 8 + 64  # the sampled rows and their indices


def test_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="method='bernoulli'"):
        backward_sampled_linear(X, W, keep=0.5, method="topk")
    with pytest.raises(ValueError, match="row_scores"):
        backward_sampled_linear(X, W, keep=0.5, row_scores="dy")
    with pytest.raises(ValueError, match="unbiased sampling method, but method is 'topk'"):
        ApproxConfig(mode="backward")
    with pytest.raises(ValueError, match="override 'linear'"):
        ApproxConfig(mode="backward", method="crs").set_op_type("linear", NodeOverride(method="topk"))
    with pytest.raises(ValueError, match="forward sampling only"):
        ApproxConfig(mode="backward", method="crs", scores="weights")
    with pytest.raises(ValueError, match="mode must be one of"):
        ApproxConfig(mode="sideways")


def test_optimize_backward_mode_rewrites_linear_nodes_and_counts_flops() -> None:
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    model = mlp()
    cfg = ApproxConfig(mode="backward", method="crs", exclude_first_last=False)
    fast = approxcompile.optimize(model, 0.7, example_inputs=(x,), config=cfg)
    calls = [n for n in fast.graph.nodes if n.target is ops.backward_sampled_linear]
    assert calls, "backward mode must rewrite some linear node"
    plan = fast.meta[META_KEY]
    assert plan.mode == "backward" and "mode=backward" in str(approxcompile.report(fast))
    # The first layer's input needs no gradient: no dX product to sample (0 dense, 0 planned).
    assert plan.nodes[0].flops.input_grad == 0 and plan.nodes[0].approx_flops.input_grad == 0
    for node in plan.nodes:
        if node.sampled:
            # forward exact; dX over k of p output features at ``keep``, dW over the rows kept at
            # its own ``row_keep`` (crs draws exactly k features / rows); 64 rows
            assert node.split and node.row_keep is not None
            rows = round(64 * node.row_keep)
            assert node.row_k == rows
            assert node.approx_flops.forward == node.flops.forward
            assert node.approx_flops.input_grad == node.flops.input_grad * node.k // node.inner
            assert node.approx_flops.weight_grad == node.flops.weight_grad * rows // 64
    assert any(n.sampled and n.flops.input_grad > 0 for n in plan.nodes), "a layer with a dX product"
    assert any(n.row_k < n.rows for n in plan.nodes if n.sampled), "some dW product is sampled"
    # the rewritten calls carry each node's two ratios
    for call in calls:
        assert set(call.kwargs) >= {"keep", "row_keep"}
    fast.train()
    assert plan.counted_flops == pytest.approx(measure_step_flops(fast, (x,)), rel=0.03)
    assert plan.fraction <= 0.7 + 1e-9
    fast.eval()
    assert torch.allclose(fast(x), model(x), atol=1e-6)


CONV_X = torch.randn(24, 6, 7, 7, generator=G) * torch.linspace(0.2, 2, 24)[:, None, None, None]
CONV_W = torch.randn(10, 6, 3, 3, generator=G) * torch.linspace(0.2, 2, 10)[:, None, None, None]
CONV_DY = torch.randn(24, 10, 4, 4, generator=G)


def _conv_grads(keep: float, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    x, w = CONV_X.clone().requires_grad_(), CONV_W.clone().requires_grad_()
    y = backward_sampled_conv(x, w, None, 2, 1, 1, keep=keep, **kw)
    assert torch.allclose(y, F.conv2d(CONV_X, CONV_W, None, 2, 1), atol=1e-5)  # forward exact
    y.backward(CONV_DY)
    return x.grad, w.grad


@pytest.mark.parametrize(("method", "row_scores"), [("bernoulli", "x_dy"), ("crs", "x")])
def test_conv_input_and_weight_gradients_are_unbiased(method: str, row_scores: str) -> None:
    """As for linear: 300 seeded draws, |mean - exact|^2 < 3 sum(var)/N, for dX and dW."""
    x, w = CONV_X.clone().requires_grad_(), CONV_W.clone().requires_grad_()
    F.conv2d(x, w, None, 2, 1).backward(CONV_DY)
    g = torch.Generator().manual_seed(99)
    draws = [_conv_grads(0.4, method=method, row_scores=row_scores, generator=g) for _ in range(300)]
    for which, exact in ((0, x.grad), (1, w.grad)):
        sq_err, floor = _bias_check([d[which] for d in draws], exact)
        assert 0 < sq_err < 3.0 * floor, (which, sq_err, floor)


def test_optimize_backward_mode_samples_convs_and_counts_flops() -> None:
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    model = cnn()
    cfg = ApproxConfig(mode="backward", method="uniform", exclude_first_last=False)
    fast = approxcompile.optimize(model, 0.7, example_inputs=(x,), config=cfg)
    assert [n for n in fast.graph.nodes if n.target is ops.backward_sampled_conv]
    plan = fast.meta[META_KEY]
    fast.train()
    assert plan.counted_flops == pytest.approx(measure_step_flops(fast, (x,)), rel=0.03)
    fast.eval()
    assert torch.allclose(fast(x), model.eval()(x), atol=1e-5)


def test_backward_mode_leaves_addmm_exact_with_a_reason() -> None:
    class AddMM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w, self.b = torch.nn.Parameter(torch.randn(32, 32)), torch.nn.Parameter(torch.zeros(32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.addmm(self.b, x, self.w)

    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    cfg = ApproxConfig(mode="backward", method="bernoulli", exclude_first_last=False)
    fast = approxcompile.optimize(AddMM(), 1.0, example_inputs=(x,), config=cfg)
    (node,) = fast.meta[META_KEY].nodes
    assert "linear, matmul, attention, conv nodes only (not addmm" in (node.reason or "")


def test_cli_inspect_backward_mode_defaults_to_bernoulli(capsys: pytest.CaptureFixture[str]) -> None:
    from approxcompile.cli import main

    argv = ["inspect", "tests.models:mlp", "--input-shape", "64,64", "--budget", "0.8", "--mode", "backward"]
    assert main(argv) == 0
    assert "method=bernoulli, budget=0.8, mode=backward" in capsys.readouterr().out
    assert main([*argv, "--method", "topk"]) == 2
    assert "pass method='bernoulli'" in capsys.readouterr().err


def test_export_refuses_a_backward_mode_plan() -> None:
    from approxcompile.export import ExportError, lower_for_export

    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    cfg = ApproxConfig(mode="backward", method="bernoulli", exclude_first_last=False)
    fast = approxcompile.optimize(mlp(), 0.7, example_inputs=(x,), config=cfg)
    with pytest.raises(ExportError, match="backward mode, which does not export"):
        lower_for_export(fast)
