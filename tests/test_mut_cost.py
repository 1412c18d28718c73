"""The cost pass on small graphs, every FLOP count worked out by hand (2·M·N·K per product).

Written for the mutants of ``passes/cost.py``: the whole-model tests compare the plan with
FlopCounterMode at a budget, which leaves room for a wrong overhead or a gradient product
counted when autograd does not need it. Small shapes keep these tests cheap.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from approxcompile.passes.cost import annotate_costs, measure_other_flops, measure_step_flops, plan_for
from approxcompile.passes.match import match
from approxcompile.passes.shapes import propagate_shapes
from approxcompile.plan import META_KEY, Flops


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 8)
        self.fc2 = nn.Linear(8, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.weight.requires_grad_(False)
        self.conv = nn.Conv2d(3, 5, 3)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc2(torch.relu(self.fc1(x)))
        y = self.frozen(h)
        a = y.view(2, 3, 4)
        m = torch.matmul(a, a.transpose(1, 2))  # (2, 3, 4) @ (2, 4, 3)
        return m, self.conv(img)


def _planned(mode: str = "forward") -> dict[str, object]:
    gm = fx.symbolic_trace(Net())
    propagate_shapes(gm, (torch.randn(6, 16), torch.randn(2, 3, 7, 7)))
    result = annotate_costs(gm, method="crs", mode=mode)  # type: ignore[arg-type]
    assert result.stats["candidates"] == 5
    return {n.meta[META_KEY].name: n.meta[META_KEY] for n in gm.graph.nodes if META_KEY in n.meta}


def test_forward_mode_flops_and_overheads_by_hand() -> None:
    plans = _planned()
    fc1, fc2, frozen, mm, conv = (plans[n] for n in ("fc1", "fc2", "frozen", "matmul", "conv"))
    # fc1: x (6, 16) needs no gradient -> no dX product; forward = dW = 2·6·16·8 = 1536
    assert (fc1.kind, fc1.op, fc1.inner) == ("linear", "Linear", 16)
    assert (fc1.shapes, fc1.out_shape) == (((6, 16), (8, 16)), (6, 8))
    assert fc1.flops == Flops(1536, 0, 1536)
    # overhead: norms 2·n·(rows + p) + selection 2·n = 2·16·14 + 32 = 480; per kept 2·(6 + 8) = 28
    assert (fc1.overhead_fixed, fc1.overhead_per_kept) == (480, 28)
    assert fc1.method == "crs" and fc1.reason is None and fc1.mode == "forward"
    # fc2: (6, 8) x (4, 8): 2·6·8·4 = 384 for each of the three products
    assert fc2.flops == Flops(384, 384, 384) and fc2.inner == 8
    assert (fc2.overhead_fixed, fc2.overhead_per_kept) == (2 * 8 * (6 + 4) + 16, 2 * (6 + 4))
    # frozen: its weight needs no gradient -> no dW product; 2·6·4·4 = 192
    assert frozen.flops == Flops(192, 192, 0)
    # matmul (2, 3, 4) @ (2, 4, 3): 2·2·3·4·3 = 144, both operands need gradients
    assert (mm.kind, mm.inner, mm.flops) == ("matmul", 4, Flops(144, 144, 144))
    # gather overhead: numel 24 + 24 = 48 -> fixed 2·48 + 2·4 = 104, per kept 2·48 // 4 = 24
    assert (mm.overhead_fixed, mm.overhead_per_kept) == (104, 24)
    # conv (2, 3, 7, 7) * (5, 3, 3, 3) -> (2, 5, 5, 5): 2·2·5·3·9·25 = 13500; the image needs no grad
    assert (conv.kind, conv.inner, conv.out_shape) == ("conv", 3, (2, 5, 5, 5))
    assert conv.flops == Flops(13500, 0, 13500)
    # numel 294 + 135 = 429 -> fixed 2·429 + 2·3 = 864, per kept 2·429 // 3 = 286
    assert (conv.overhead_fixed, conv.overhead_per_kept) == (864, 286)


def test_backward_mode_costs_by_hand() -> None:
    plans = _planned("backward")
    fc2 = plans["fc2"]
    # fc2: x (6, 8), w (4, 8), y (6, 4): dX samples the p = 4 outputs, dW the 6 rows
    assert (fc2.mode, fc2.inner, fc2.k, fc2.rows) == ("backward", 4, 4, 6)
    # linear and conv size dX and dW apart (row_keep), each charged its own overhead:
    # dX: norms 2·(w 32 + y 24) = 112; per kept output a slice of y (24/4) and of w (32/4) = 14
    # dW: norms 2·(x 48 + y 24) = 144; per kept row a slice of x (48/6) and of y (24/6) = 12
    assert fc2.split and fc2.row_keep == 1.0 and fc2.row_k == 6
    assert (fc2.overhead_fixed, fc2.overhead_per_kept) == (112, 14)
    assert (fc2.row_overhead_fixed, fc2.row_overhead_per_kept) == (144, 12)
    assert type(fc2.overhead_fixed) is int and type(fc2.row_overhead_per_kept) is int  # FLOP counts
    assert fc2.flops == Flops(384, 384, 384) and fc2.reason is None
    # each product at its own count: dX 2 of 4 outputs, dW 3 of 6 rows
    assert fc2.cost(2, 3) == 384 + (192 + 112 + 2 * 14) + (192 + 144 + 3 * 12)
    assert fc2.cost(4, 3) == 384 + 384 + (192 + 144 + 3 * 12)  # dX exact: no dX overhead
    conv = plans["conv"]
    # conv: x (2, 3, 7, 7) 294, w (5, 3, 3, 3) 135, y (2, 5, 5, 5) 250; p = 5 out channels, rows 2
    assert (conv.inner, conv.k, conv.rows) == (5, 5, 2)
    # dX: 2·(135 + 250) = 770; (250 + 135)//5 = 77. dW: 2·(294 + 250) = 1088; (294 + 250)//2 = 272
    assert (conv.overhead_fixed, conv.overhead_per_kept) == (770, 77)
    assert (conv.row_overhead_fixed, conv.row_overhead_per_kept) == (1088, 272)
    # a matmul between activations samples its gradient products per batch slice: over the
    # 3 output columns of its (2, 3, 4) @ (2, 4, 3) product
    mm = plans["matmul"]
    assert mm.mode == "backward" and mm.reason is None
    assert (mm.inner, mm.rows) == (3, 3)
    # its op takes one ratio: dW shares keep, and the shared overhead is charged per kept output
    assert mm.row_keep is None and not mm.split


def test_a_node_without_shapes_stays_exact_with_a_reason() -> None:
    gm = fx.symbolic_trace(Net())
    node = next(n for n in gm.graph.nodes if n.target == "fc1")
    site = match(gm, node)
    assert site is not None
    for mode in ("forward", "backward"):
        plan = plan_for(site, gm, node, "topk", mode)  # type: ignore[arg-type]
        assert plan.reason == "unknown shape (not a tensor in shape propagation)"
        assert (plan.flops, plan.inner, plan.shapes, plan.out_shape) == (Flops(0, 0, 0), 1, (), ())
        assert plan.method == "topk" and plan.mode == mode


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 8)
        self.b = nn.Linear(8, 4)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.bn(self.a(x))
        q = h.view(1, 6, 8)
        att = F.scaled_dot_product_attention(q, q, q)  # planned, exact by default
        return self.b(h), att


def test_step_flops_by_hand_without_writing_grad() -> None:
    model = Tiny()
    # a: forward and dW 2·6·16·8 = 1536 each (x needs no gradient); b: 3 · 2·6·8·4 = 1152.
    # SDPA (1, 6, 8) twice forward (2·6·6·8 = 576 each) and four gradient products: 6·576 = 3456.
    flops = measure_step_flops(model, (torch.randn(6, 16),))
    assert flops == 2 * 1536 + 1152 + 3456
    assert all(p.grad is None for p in model.parameters())


def test_other_flops_are_the_step_less_the_planned_nodes_and_leave_the_model_as_it_was() -> None:
    gm = fx.symbolic_trace(Tiny())
    x = torch.randn(6, 16)
    propagate_shapes(gm, (x,))
    annotate_costs(gm, method="topk")
    gm.train()
    before = gm.bn.running_mean.clone()
    flops = measure_other_flops(gm, (x,))
    # planned: a 3072 + b 1152 (both linear) + SDPA's 3456 (an exact attention node): nothing else
    assert (flops.step, flops.matched, flops.counted, flops.other) == (7680, 7680, True, 0)
    assert gm.training  # restored
    assert torch.equal(gm.bn.running_mean, before)  # counted in eval mode
    gm.eval()
    measure_other_flops(gm, (x,))
    assert not gm.training


def test_a_step_that_cannot_run_counts_no_other_flops_with_a_warning() -> None:
    gm = fx.symbolic_trace(Tiny())
    propagate_shapes(gm, (torch.randn(6, 16),))
    annotate_costs(gm, method="topk")
    gm.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flops = measure_other_flops(gm, (torch.randn(5, 3),))  # wrong width: the step fails
    assert (flops.step, flops.matched, flops.counted, flops.other) == (0, 7680, False, 0)
    assert gm.training
    (warning,) = [
        w for w in caught if "FLOPs outside matmul/linear/conv nodes are taken as 0" in str(w.message)
    ]
    assert warning.filename == __file__  # points at the caller's line


def test_step_flops_sum_every_output_that_needs_a_gradient() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"a": self.a(x), "b": self.b(x), "n": torch.ones(2)}

    # each: forward and dW 2·3·4·4 = 96 (x needs no gradient), both outputs reach the loss
    assert measure_step_flops(Two(), (torch.randn(3, 4),)) == 4 * 96
    frozen = Two().requires_grad_(False)
    assert measure_step_flops(frozen, (torch.randn(3, 4),)) == 2 * 96  # forward only


@pytest.mark.parametrize("mode", ["forward", "backward"])
def test_annotate_costs_counts_only_matched_nodes(mode: str) -> None:
    gm = fx.symbolic_trace(Tiny())
    propagate_shapes(gm, (torch.randn(6, 16),))
    result = annotate_costs(gm, method="bernoulli", mode=mode)  # type: ignore[arg-type]
    assert result.stats["candidates"] == 3 and not result.modified
    kinds_by_name = {
        n.meta[META_KEY].name: n.meta[META_KEY].kind for n in gm.graph.nodes if META_KEY in n.meta
    }
    assert sorted(kinds_by_name.values()) == ["attention", "linear", "linear"]
    assert {"a", "b"} <= set(kinds_by_name)


def test_annotate_costs_takes_its_options_by_keyword() -> None:
    gm = fx.symbolic_trace(Tiny())
    with pytest.raises(TypeError):
        annotate_costs(gm, "topk")  # type: ignore[misc]
