"""Activation × activation products: sdpa exact by default or decomposed, indices per (batch, head)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import approxcompile
from approxcompile import ApproxConfig, NodeOverride, kinds, ops
from approxcompile.ops import attention as att
from approxcompile.passes.flops import FLOP_FIXES
from approxcompile.plan import META_KEY
from tests.models import attention as hand_written_attention


class Block(nn.Module):
    """A pre-norm transformer block whose attention is ``F.scaled_dot_product_attention``."""

    def __init__(self, d: int = 32, heads: int = 2, causal: bool = True) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Tiny(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.inp, self.block, self.head = nn.Linear(8, d), Block(d), nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.inp(x)))


X = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(0))


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return Tiny()


def _step_flops(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False, custom_mapping=FLOP_FIXES) as counter:
        module(x).sum().backward()
    module.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def _attention_nodes(fast: torch.fx.GraphModule) -> list:
    return [n for n in fast.meta[META_KEY].nodes if n.kind == "attention"]


# -- configuration -----------------------------------------------------------------------------


def test_attention_setting_is_validated_and_round_trips() -> None:
    cfg = ApproxConfig(attention="decomposed")
    assert ApproxConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["attention"] == "decomposed"
    assert ApproxConfig().attention == "exact"
    with pytest.raises(ValueError, match="attention must be one of"):
        ApproxConfig(attention="fused")
    assert approxcompile.config.op_kind(F.scaled_dot_product_attention) == "attention"


# -- exact by default, decomposed on request ------------------------------------------------


def test_sdpa_is_exact_by_default_and_the_report_says_why() -> None:
    model = _tiny()
    fast = approxcompile.optimize(model, 0.7, example_inputs=(X,), config=ApproxConfig(frontend="fx"))
    (node,) = _attention_nodes(fast)
    assert node.reason == kinds.ATTENTION_EXACT and not node.sampled
    g, t, e = 2 * 2, 64, 16
    assert node.flops.forward == 2 * g * t * t * (e + e)  # Q·Kᵀ and P·V, as FlopCounterMode counts
    assert F.scaled_dot_product_attention in {n.target for n in fast.graph.nodes}
    assert "fused kernel" in str(approxcompile.report(fast))


@pytest.mark.parametrize("mode", ["forward", "backward"])
def test_decomposed_attention_is_sampled_within_the_budget(mode: str) -> None:
    model = _tiny()
    budget = 0.45 if mode == "forward" else 0.65
    method = "topk" if mode == "forward" else "uniform"
    cfg = ApproxConfig(attention="decomposed", mode=mode, method=method, frontend="fx")
    fast = approxcompile.optimize(model, budget, example_inputs=(X,), config=cfg)
    (node,) = _attention_nodes(fast)
    assert node.sampled and node.reason is None
    op = ops.sampled_attention if mode == "forward" else ops.backward_sampled_attention
    assert op in {n.target for n in fast.graph.nodes}
    plan = approxcompile.report(fast).plan
    fast.train()
    dense, measured = _step_flops(model, X), _step_flops(fast, X)
    assert plan.dense_flops == dense
    assert measured / dense <= budget
    # The fused kernel's backward recomputes Q·Kᵀ (FlopCounterMode counts it); the plan keeps
    # that among the other FLOPs, and taken apart it is not run: the step is below the plan by it.
    recompute = 2 * 4 * 64 * 64 * 16
    assert measured <= plan.counted_flops <= measured + recompute
    fast.eval()
    torch.testing.assert_close(fast(X), model.eval()(X))  # eval: the fused op, exact
    if mode == "backward":
        fast.train()
        torch.testing.assert_close(fast(X), model.train()(X), atol=1e-5, rtol=1e-4)  # forward exact


def test_decomposed_attention_in_an_exported_graph() -> None:
    model = _tiny()
    cfg = ApproxConfig(attention="decomposed", frontend="export")
    fast = approxcompile.optimize(model, 0.45, example_inputs=(X,), config=cfg)
    (node,) = _attention_nodes(fast)
    assert node.sampled and node.op == "aten.scaled_dot_product_attention"
    assert ops.sampled_attention in {n.target for n in fast.graph.nodes}
    fast.eval()
    torch.testing.assert_close(fast(X), model.eval()(X))
    fast.train()
    assert not torch.allclose(fast(X), model.train()(X), atol=1e-3)  # sampled in training
    from approxcompile.export import ExportError, lower_for_export

    with pytest.raises(ExportError, match="no export twin"):  # no ONNX twin: leave it exact to export
        lower_for_export(fast)


# -- the op: sdpa's arguments, per-slice indices, unbiased gradients ---------------------------

Q, K, V = (torch.randn(2, 3, 12, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
MASK = torch.rand(12, 12, generator=torch.Generator().manual_seed(3)) > 0.4
MASK.fill_diagonal_(True)


@pytest.mark.parametrize(
    "kw",
    [{}, {"is_causal": True}, {"attn_mask": MASK}, {"attn_mask": MASK.float() - 1.0}, {"scale": 0.3}],
    ids=["plain", "causal", "bool-mask", "float-mask", "scale"],
)
def test_taken_apart_attention_computes_what_sdpa_computes(kw: dict) -> None:
    q, k, v = (t.clone().requires_grad_() for t in (Q, K, V))
    want = F.scaled_dot_product_attention(Q, K, V, **kw)
    got = ops.backward_sampled_attention(q, k, v, **kw, keep=0.5, method="uniform")  # forward exact
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    full = ops.sampled_attention(Q, K, V, **kw, keep=1.0)  # keeps everything: the fused op
    assert torch.equal(full, want)
    sampled = ops.sampled_attention(Q, K, V, **kw, keep=0.5)
    assert sampled.shape == want.shape and not torch.allclose(sampled, want, atol=1e-3)


def test_dropout_applies_in_training_only() -> None:
    torch.manual_seed(0)
    with_dropout = ops.sampled_attention(Q, K, V, None, 0.5, keep=0.5)
    without = ops.sampled_attention(Q, K, V, None, 0.0, keep=0.5)
    assert not torch.allclose(with_dropout, without)
    evaluated = ops.sampled_attention(Q, K, V, None, 0.0, keep=0.5, training=False)
    assert torch.equal(evaluated, F.scaled_dot_product_attention(Q, K, V))


@pytest.mark.parametrize("method", ["topk", "uniform", "crs", "bernoulli"])
def test_every_slice_draws_its_own_indices(method: str) -> None:
    """Forward mode: unsampled columns of a slice get a zero gradient; the sets differ by slice."""
    a = torch.randn(6, 5, 32, generator=torch.Generator().manual_seed(0)).requires_grad_()
    b = torch.randn(6, 32, 4, generator=torch.Generator().manual_seed(1))
    att.sampled_bmm(a, b, 8, method, 0.1, None).sum().backward()
    assert a.grad is not None
    kept = [frozenset((a.grad[g].abs().sum(0) > 0).nonzero().flatten().tolist()) for g in range(6)]
    assert all(0 < len(s) < 32 for s in kept)
    assert len(set(kept)) > 1


def test_a_method_without_a_vectorised_draw_is_drawn_row_by_row() -> None:
    """Methods added to ``sample_pairs`` later (e.g. a new unbiased one) still sample per slice."""
    scores = torch.rand(5, 40, generator=torch.Generator().manual_seed(0))
    index, scale = att.rowwise_pairs(scores, 6, "crs", 0.1, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    for r in range(5):
        want_index, want_scale = ops.sample_pairs(scores[r], 6, "crs", eps=0.1, generator=g)
        assert torch.equal(index[r], want_index) and torch.allclose(scale[r], want_scale)
    with pytest.raises(ValueError, match="unknown sampling method"):
        att.slice_pairs(scores, 6, "no-such-method", 0.1, None)


def test_backward_mode_gradients_use_one_index_set_per_slice() -> None:
    """Replay the draws: dA of each (batch, head) slice is that slice's own sampled product."""
    a = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
    b = torch.randn(2, 3, 16, 12, generator=torch.Generator().manual_seed(1)).requires_grad_()
    dy = torch.randn(2, 3, 5, 12, generator=torch.Generator().manual_seed(2))
    y = ops.backward_sampled_matmul(
        a, b, keep=0.25, method="uniform", generator=torch.Generator().manual_seed(7)
    )
    torch.testing.assert_close(y, a @ b)  # the forward is exact
    da, db = torch.autograd.grad(y, (a, b), dy)
    b3, dy3 = b.detach().reshape(6, 16, 12), dy.reshape(6, 5, 12)
    scores = torch.linalg.vector_norm(dy3, dim=1) * torch.linalg.vector_norm(b3, dim=1)
    index, scale = att.slice_pairs(scores, 3, "uniform", 0.1, torch.Generator().manual_seed(7))
    assert len({tuple(sorted(r.tolist())) for r in index}) > 1  # the slices kept different columns
    want = torch.stack([(dy3[g][:, index[g]] * scale[g]) @ b3[g][:, index[g]].T for g in range(6)])
    torch.testing.assert_close(da, want.view_as(a))
    assert db.shape == b.shape and db.abs().sum() > 0


def _bias_check(draws: list[torch.Tensor], exact: torch.Tensor) -> tuple[float, float]:
    """(|mean - exact|², sum(var)/N): the first has expectation the second when unbiased."""
    s = torch.stack(draws)
    return float((s.mean(0) - exact).pow(2).sum()), float(s.var(0).sum()) / len(draws)


@pytest.mark.parametrize("method", ["bernoulli", "crs", "uniform"])
def test_backward_matmul_gradients_are_unbiased(method: str) -> None:
    """300 draws; an unbiased mean misses by sum(var)/N in expectation: allow 3x (hundreds of entries)."""
    a = torch.randn(2, 2, 6, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
    b = torch.randn(2, 2, 16, 10, generator=torch.Generator().manual_seed(1)).requires_grad_()
    dy = torch.randn(2, 2, 6, 10, generator=torch.Generator().manual_seed(2))
    exact = torch.autograd.grad(a @ b, (a, b), dy)
    g = torch.Generator().manual_seed(1234)
    draws = [
        torch.autograd.grad(
            ops.backward_sampled_matmul(a, b, keep=0.3, method=method, generator=g), (a, b), dy
        )
        for _ in range(300)
    ]
    for which in (0, 1):
        sq_err, floor = _bias_check([d[which] for d in draws], exact[which])
        assert 0 < floor and sq_err < 3.0 * floor, (which, sq_err, floor)


def test_the_check_catches_a_biased_estimator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropping the 1/q rescaling of bernoulli (a plausible bug) fails the same check."""
    unbiased = att.slice_pairs

    def unscaled(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
        index, scale = unbiased(*args)  # type: ignore[arg-type]
        return index, (scale > 0).float()

    monkeypatch.setattr(att, "slice_pairs", unscaled)
    a = torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
    b = torch.randn(4, 16, 10, generator=torch.Generator().manual_seed(1)).requires_grad_()
    exact = torch.autograd.grad(a @ b, (a, b), torch.ones(4, 6, 10))
    g = torch.Generator().manual_seed(1234)
    draws = [
        torch.autograd.grad(
            ops.backward_sampled_matmul(a, b, keep=0.3, method="bernoulli", generator=g),
            (a, b),
            torch.ones(4, 6, 10),
        )
        for _ in range(150)
    ]
    sq_err, floor = _bias_check([d[0] for d in draws], exact[0])
    assert sq_err > 3.0 * floor


@pytest.mark.slow
def test_backward_attention_gradients_are_unbiased() -> None:
    """dQ, dK through the softmax of a sampled dP, and dV: unbiased by the tower property."""
    q, k, v = (t.clone().requires_grad_() for t in (Q, K, V))
    dy = torch.randn(Q.shape, generator=torch.Generator().manual_seed(5))
    exact = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), dy)
    g = torch.Generator().manual_seed(99)
    draws = [
        torch.autograd.grad(
            ops.backward_sampled_attention(
                q, k, v, is_causal=True, keep=0.4, method="bernoulli", generator=g
            ),
            (q, k, v),
            dy,
        )
        for _ in range(200)
    ]
    for which in (0, 1, 2):
        sq_err, floor = _bias_check([d[which] for d in draws], exact[which])
        assert 0 < floor and sq_err < 3.0 * floor, (which, sq_err, floor)


def test_hand_written_attention_matmuls_are_sampled_in_backward_mode() -> None:
    x = torch.randn(4, 32, 32, generator=torch.Generator().manual_seed(0))
    cfg = ApproxConfig(mode="backward", method="bernoulli", exclude_first_last=False)
    cfg = cfg.set_op_type("matmul", NodeOverride(keep=0.5))
    model = hand_written_attention()
    fast = approxcompile.optimize(model, 1.0, example_inputs=(x,), config=cfg)
    matmuls = [n for n in fast.meta[META_KEY].nodes if n.kind == "matmul"]
    assert len(matmuls) == 2 and all(n.mode == "backward" and n.sampled for n in matmuls)
    assert ops.backward_sampled_matmul in {n.target for n in fast.graph.nodes}
    fast.train()
    torch.testing.assert_close(fast(x), model.train()(x), atol=1e-5, rtol=1e-4)  # forward exact
    fast.eval()
    torch.testing.assert_close(fast(x), model.eval()(x))


def test_flop_formulas_count_the_sampled_gradients() -> None:
    a = torch.randn(6, 8, 32, requires_grad=True)
    b = torch.randn(6, 32, 16, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        ops.backward_sampled_matmul(a, b, keep=0.25, method="uniform").sum().backward()
    forward = 2 * 6 * 8 * 32 * 16
    assert counter.get_total_flops() == forward + forward * 4 // 16 + forward * 2 // 8


@pytest.mark.slow
def test_attention_ops_compile_without_breaks() -> None:
    torch.manual_seed(0)
    q, k, v = (t.clone().requires_grad_() for t in (Q, K, V))

    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        y = ops.sampled_attention(q, k, v, is_causal=True, keep=0.5)
        return ops.backward_sampled_matmul(y, v.transpose(-2, -1), keep=0.5, method="uniform")

    torch._dynamo.reset()
    assert torch._dynamo.explain(step)(q, k, v).graph_break_count == 0
    torch.compile(step, fullgraph=True)(q, k, v).sum().backward()
    assert q.grad is not None and v.grad is not None
