"""The rewrite pass's generated calls, written out by hand, on small models with fixed keep ratios.

Written for the mutants of ``passes/rewrite.py``: the keyword arguments each option adds
(``eps``, ``scores``/``seed``, ``row_scores``), the ``training`` flag, operands that are
nodes replaced earlier in the same pass, and the plans' ``site`` dropped afterwards.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

import approxcompile
from approxcompile import ApproxConfig, NodeOverride, ops, passes
from approxcompile.plan import META_KEY


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


X = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))


def _fast(**config: object) -> torch.fx.GraphModule:
    cfg = ApproxConfig(exclude_first_last=False, **config).set_op_type(  # type: ignore[arg-type]
        "linear", NodeOverride(keep=0.5)
    )
    torch.manual_seed(0)
    return approxcompile.optimize(Two(), 0.9, example_inputs=(X,), config=cfg)


def _calls(gm: torch.fx.GraphModule) -> list[tuple[object, dict]]:
    return [(n.target, dict(n.kwargs)) for n in gm.graph.nodes if n.target in ops.SAMPLED_OPS]


def _flag(gm: torch.fx.GraphModule) -> torch.fx.Node:
    (flag,) = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "training"]
    return flag


def test_default_calls_carry_keep_method_and_the_training_flag_only() -> None:
    fast = _fast()
    flag = _flag(fast)
    assert _calls(fast) == [
        (ops.sampled_linear, {"keep": 0.5, "method": "topk", "training": flag}),
        (ops.sampled_linear, {"keep": 0.5, "method": "topk", "training": flag}),
    ]
    nodes = list(fast.graph.nodes)
    assert nodes[0].op == "placeholder" and nodes[1] is flag  # read once, right after the input
    # parameters are read from the original submodules: the state_dict keys stay
    assert set(fast.state_dict()) == {"a.weight", "a.bias", "b.weight", "b.bias"}
    assert "self.a.weight" in fast.code and "self.b.bias" in fast.code
    # the plans outlive the pass without the Site that pointed into the old graph
    plans = [n.meta[META_KEY] for n in fast.graph.nodes if META_KEY in n.meta]
    assert len(plans) == 2 and all(p.site is None for p in plans)
    assert all(n.meta.get("tensor_meta") is not None for n in fast.graph.nodes if n.target in ops.SAMPLED_OPS)


def test_a_non_default_eps_is_passed_on() -> None:
    assert [kw.get("eps") for _, kw in _calls(_fast(eps=0.25))] == [0.25, 0.25]


def test_weight_scores_pass_the_nodes_own_seed_for_random_methods() -> None:
    topk = _fast(scores="weights")
    assert [kw.get("scores") for _, kw in _calls(topk)] == ["weights", "weights"]
    assert all("seed" not in kw for _, kw in _calls(topk))
    crs = _fast(scores="weights", method="crs", seed=7)
    # seed 7 · 1,000,003 + crc32 of the node's name, mod 2^63
    want = [(7 * 1_000_003 + zlib.crc32(name)) % 2**63 for name in (b"a", b"b")]
    assert [kw["seed"] for _, kw in _calls(crs)] == want
    assert all(kw["method"] == "crs" and kw["scores"] == "weights" for _, kw in _calls(crs))
    # a large seed wraps into int64's non-negative range: below 2^63
    big = _fast(scores="weights", method="bernoulli", seed=2**62)
    want = [(2**62 * 1_000_003 + zlib.crc32(name)) % 2**63 for name in (b"a", b"b")]
    assert [kw["seed"] for _, kw in _calls(big)] == want and all(w < 2**63 for w in want)


def test_backward_mode_calls_the_backward_ops_with_their_row_scores() -> None:
    fast = _fast(mode="backward", method="bernoulli")
    assert {t for t, _ in _calls(fast)} == {ops.backward_sampled_linear}
    assert all("row_scores" not in kw for _, kw in _calls(fast))  # x_dy is the default
    rows = _fast(mode="backward", method="bernoulli", row_scores="x")
    assert [kw.get("row_scores") for _, kw in _calls(rows)] == ["x", "x"]


class Chained(nn.Module):
    """The matmul's operands are the outputs of sampled linears: nodes replaced earlier."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.q(x), self.k(x).transpose(-1, -2))


def test_operands_replaced_earlier_in_the_pass_are_the_new_nodes() -> None:
    cfg = ApproxConfig(exclude_first_last=False).set_op_type("linear", NodeOverride(keep=0.5))
    cfg = cfg.set_op_type("matmul", NodeOverride(keep=0.5))
    x = torch.randn(2, 8, 32)
    model = Chained()
    fast = approxcompile.optimize(model, 0.9, example_inputs=(x,), config=cfg)
    calls = [n for n in fast.graph.nodes if n.target in ops.SAMPLED_OPS]
    assert [n.target for n in calls] == [ops.sampled_linear, ops.sampled_linear, ops.sampled_matmul]
    assert calls[2].args[0] is calls[0]  # q's new node, not the erased call_module
    fast.graph.lint()
    fast.eval()  # exact in eval: the original product
    torch.testing.assert_close(fast(x), model(x))


def test_rewriting_again_changes_nothing() -> None:
    fast = _fast()
    code = fast.code
    result = passes.rewrite(fast, ApproxConfig())
    assert (result.modified, result.stats["replaced"], fast.code) == (False, 0, code)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))) + y


def test_the_training_flag_comes_after_every_input() -> None:
    cfg = ApproxConfig(exclude_first_last=False).set_op_type("linear", NodeOverride(keep=0.5))
    fast = approxcompile.optimize(TwoInputs(), 0.9, example_inputs=(X, X), config=cfg)
    ops_in_order = [n.op for n in fast.graph.nodes]
    assert ops_in_order[:3] == ["placeholder", "placeholder", "get_attr"]
    assert list(fast.graph.nodes)[2] is _flag(fast)
