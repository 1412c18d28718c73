"""FLOPs outside the sampled products: the budget's denominator is the whole step FlopCounterMode sees.

The reference counts come from ``FlopCounterMode`` run here on the user's model (not through
the library's helper) and from products worked out by hand.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import approxcompile
from approxcompile import ApproxConfig, ops


def _step_flops(module: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward + backward, counted by FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        module(x).sum().backward()
    module.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


class SDPANet(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x))
        return self.head(self.o(att))


class Block(nn.Module):
    """Marked as a leaf below: the planner sees one opaque call, FlopCounterMode its Linear."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))


class LeafNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 64)
        self.block = Block(64)
        self.mid = nn.Linear(64, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mid(self.block(torch.relu(self.inp(x))))))


B, L, E = 4, 12, 32
# SDPA: Q·K^T and A·V forward (2·B·L·L·E each), their four gradient products backward.
SDPA_FLOPS = 6 * 2 * B * L * L * E  # 221,184
M = 64
LEAF_FLOPS = 3 * 2 * M * 64 * 64  # the leaf's Linear: forward, dX and dW products = 1,572,864


def _case(name: str) -> tuple[nn.Module, torch.Tensor, ApproxConfig, int]:
    torch.manual_seed(0)
    if name == "sdpa":
        return SDPANet(), torch.randn(B, L, E), ApproxConfig(exclude_first_last=False), SDPA_FLOPS
    cfg = ApproxConfig(exclude_first_last=False, leaf_modules=(Block,))
    return LeafNet(), torch.randn(M, 64), cfg, LEAF_FLOPS


@pytest.mark.parametrize("name", ["sdpa", "leaf"])
def test_other_flops_are_the_hand_counted_products(name: str) -> None:
    model, x, cfg, other = _case(name)
    fast = approxcompile.optimize(model, 0.7, example_inputs=(x,), config=cfg)
    plan = approxcompile.report(fast).plan
    # sdpa is a matched node left exact (kinds.ATTENTION_EXACT): its FLOPs are its own, not "other"
    attention = sum(n.flops.total for n in plan.nodes if n.kind == "attention")
    assert plan.other_flops + attention == other
    # ... and the matched nodes plus the rest are what FlopCounterMode counts on the user's model
    assert plan.dense_flops == _step_flops(model, x)


@pytest.mark.parametrize("budget", [0.5, 0.7])
@pytest.mark.parametrize("name", ["sdpa", "leaf"])
def test_flop_fraction_measured_by_flop_counter_mode_fits_the_budget(name: str, budget: float) -> None:
    model, x, cfg, _ = _case(name)
    fast = approxcompile.optimize(model, budget, example_inputs=(x,), config=cfg)
    assert any(n.target in ops.SAMPLED_OPS for n in fast.graph.nodes), "something must be sampled"
    fast.train()
    dense, measured = _step_flops(model, x), _step_flops(fast, x)
    assert measured / dense <= budget  # products alone; the plan also charges the overhead
    plan = approxcompile.report(fast).plan
    assert plan.counted_flops == pytest.approx(measured, rel=0.03)
