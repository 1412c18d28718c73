"""Exclusion reasons at their boundaries, on a small MLP (written for ``passes/exclusions.py``'s mutants)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import approxcompile
from approxcompile import ApproxConfig, NodeOverride, passes


class Three(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _reasons(config: ApproxConfig) -> dict[str, str | None]:
    torch.manual_seed(0)
    fast = approxcompile.optimize(Three(), 1.0, example_inputs=(torch.randn(8, 32),), config=config)
    return {p.name: p.reason for p in approxcompile.report(fast).nodes}


def test_a_min_k_above_the_inner_dimension_keeps_the_node_exact() -> None:
    # inner 32: min_k 40 and min_k 32 both leave nothing to sample; min_k 31 does not
    cfg = (
        ApproxConfig(exclude_first_last=False)
        .set_module_name("a", NodeOverride(min_k=40))
        .set_module_name("b", NodeOverride(min_k=32))
        .set_module_name("c", NodeOverride(min_k=31))
    )
    reasons = _reasons(cfg)
    assert reasons["a"] == "inner dimension 32 is not above min_k=40"
    assert reasons["b"] == "inner dimension 32 is not above min_k=32"
    assert reasons["c"] == "budget is met without sampling this node"  # eligible, then not needed


def test_first_and_last_are_exact_unless_an_override_fixes_their_keep() -> None:
    reasons = _reasons(ApproxConfig())
    assert reasons["a"] == "first candidate node (kept exact, as in the paper)"
    assert reasons["c"] == "last candidate node (kept exact, as in the paper)"
    fixed = _reasons(ApproxConfig().set_module_name("c", NodeOverride(keep=0.5)))
    assert fixed["c"] is None and fixed["a"] == "first candidate node (kept exact, as in the paper)"


def test_a_fixed_keep_never_goes_below_min_k() -> None:
    # keep 0.25 of 32 would be 8 columns; min_k 16 raises it to 16/32 = 0.5
    cfg = ApproxConfig().set_module_name("b", NodeOverride(keep=0.25, min_k=16))
    torch.manual_seed(0)
    fast = approxcompile.optimize(Three(), 1.0, example_inputs=(torch.randn(8, 32),), config=cfg)
    b = next(p for p in approxcompile.report(fast).nodes if p.name == "b")
    assert (b.keep, b.k, b.reason) == (0.5, 16, None)


def test_the_pass_counts_the_nodes_it_excludes() -> None:
    gm = torch.fx.symbolic_trace(Three())
    passes.propagate_shapes(gm, (torch.randn(8, 32),))
    passes.annotate_costs(gm, method="topk")
    result = passes.apply_exclusions(gm, ApproxConfig())
    assert result.stats["excluded"] == 2 and not result.modified  # first and last; meta only
    gm = torch.fx.symbolic_trace(Three())
    passes.propagate_shapes(gm, (torch.randn(8, 32),))
    passes.annotate_costs(gm, method="topk")
    assert passes.apply_exclusions(gm, ApproxConfig(exclude_first_last=False)).stats["excluded"] == 0


class Block(nn.Module):
    """A functional linear inside a submodule: the node's owner is the module ``blk``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 32) / 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w)


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blk, self.out = Block(), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.blk(x)))


def test_a_module_name_override_reaches_the_calls_inside_that_module() -> None:
    cfg = ApproxConfig(exclude_first_last=False).set_module_name("blk", NodeOverride(exact=True))
    fast = approxcompile.optimize(Functional(), 1.0, example_inputs=(torch.randn(8, 32),), config=cfg)
    plans = {p.name: p for p in approxcompile.report(fast).nodes}
    (name,) = [n for n in plans if n != "out"]
    assert plans[name].reason == "left exact by override (module_name 'blk')"
    assert plans["out"].reason == "budget is met without sampling this node"


def test_rewrite_reports_a_single_replacement_as_a_modification() -> None:
    gm = torch.fx.symbolic_trace(Three())
    cfg = ApproxConfig(exclude_first_last=False).set_module_name("b", NodeOverride(keep=0.5))
    cfg = cfg.set_module_name("a", NodeOverride(exact=True)).set_module_name("c", NodeOverride(exact=True))
    passes.propagate_shapes(gm, (torch.randn(8, 32),))
    passes.annotate_costs(gm, method="topk")
    passes.apply_exclusions(gm, cfg)
    passes.allocate(gm, budget=1.0, other_flops=0)
    b = next(n for n in gm.graph.nodes if n.target == "b")
    b.meta["user_note"] = "kept"  # any meta entry but tensor_meta moves to the new node
    result = passes.rewrite(gm, cfg)
    assert (result.modified, result.stats["replaced"]) == (True, 1)
    (new,) = [n for n in gm.graph.nodes if n.target is approxcompile.sampled_linear]
    assert new.meta["user_note"] == "kept" and new.meta["tensor_meta"].shape == (8, 32)
