"""The op-kind registry: every part of the compiler reads the same entries."""

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import approxcompile
from approxcompile import kinds, ops, passes
from approxcompile.choices import MODES, OP_TYPES
from approxcompile.config import ApproxConfig, NodeOverride, op_kind
from approxcompile.export import estimators
from approxcompile.export.lower import TWINS, lower_for_export
from approxcompile.plan import META_KEY


def test_every_runtime_op_belongs_to_one_kind_and_mode() -> None:
    found = kinds.runtime_ops()
    assert set(found) == set(ops.SAMPLED_OPS)
    assert found[ops.backward_sampled_conv] == (kinds.KINDS["conv"], "backward")
    assert found[ops.sampled_addmm] == (kinds.KINDS["addmm"], "forward")


def test_each_target_is_matched_by_one_kind_and_is_a_config_alias() -> None:
    seen = set()
    for kind in kinds.KINDS.values():
        assert kind.op_type in OP_TYPES
        for matcher in kind.matchers:
            for target in matcher.targets:
                assert (matcher.node_op, target) not in seen
                seen.add((matcher.node_op, target))
                assert op_kind(target) == kind.op_type
    assert op_kind(torch.addmm) == "linear" and op_kind(nn.Conv3d) == "conv"
    assert op_kind(torch.bmm) == "matmul"


def test_export_twins_come_from_the_registry() -> None:
    for kind in kinds.KINDS.values():
        twin = kinds.export_twin(kind)
        assert twin is getattr(estimators, kind.export_twin or "", None)
        assert TWINS.get(kind.forward_op) is twin


def test_backend_support() -> None:
    linear, matmul = kinds.KINDS["linear"], kinds.KINDS["matmul"]
    assert linear.support("runtime").modes == MODES
    assert linear.support("runtime").scores == ("activations", "weights")
    assert matmul.support("runtime").modes == MODES  # backward: indices per (batch, head) slice
    assert kinds.KINDS["addmm"].support("runtime").modes == ("forward",)
    assert kinds.KINDS["attention"].support("export").modes == ()  # no twin: export refuses it
    assert matmul.support("runtime").scores == ("activations",)
    assert linear.support("export").modes == ("forward",)
    assert linear.support("export").scores == ("activations",)
    assert kinds.backward_only_message() == (
        "backward mode samples linear, matmul, attention, conv nodes only (not addmm / baddbmm)"
    )


class _Chain(nn.Module):
    """Products feeding products directly, through every matcher the registry has."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.w = nn.Parameter(torch.randn(64, 64) / 8)
        self.b = nn.Parameter(torch.zeros(64))
        self.m = nn.Parameter(torch.randn(64, 64) / 8)
        self.conv = nn.Conv1d(64, 64, 1)
        self.head = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.a(x), self.w, self.b)
        h = torch.addmm(self.b, h, self.m)
        h = torch.matmul(h, self.m)
        h = F.conv1d(self.conv(h.unsqueeze(-1)), self.w.unsqueeze(-1)).squeeze(-1)
        return self.head(h)


def test_plans_carry_the_site_until_rewrite_drops_it() -> None:
    torch.manual_seed(0)
    model, x = _Chain(), torch.randn(32, 64)
    gm = passes.trace(model).graph_module
    passes.propagate_shapes(gm, (x,))
    passes.annotate_costs(gm, method="topk")
    plans = [n.meta[META_KEY] for n in gm.graph.nodes if META_KEY in n.meta]
    assert [p.site.kind for p in plans] == ["linear", "linear", "addmm", "matmul", "conv", "conv", "linear"]
    assert [p.kind for p in plans] == ["linear", "linear", "linear", "matmul", "conv", "conv", "linear"]

    config = ApproxConfig(exclude_first_last=False, min_inner=8)
    fast = approxcompile.optimize(model, 0.3, example_inputs=(x,), config=config)
    assert all(n.site is None for n in approxcompile.report(fast).nodes)
    sampled = [n for n in fast.graph.nodes if n.op == "call_function" and n.target in ops.SAMPLED_OPS]
    assert len(sampled) == 7
    # Each sampled op reads the previous one's output where the original product did: the
    # stored sites' operands were redirected to the nodes that replaced them.
    assert sampled[1].args[0] is sampled[0] and sampled[2].args[1] is sampled[1]
    assert sampled[3].args[0] is sampled[2]
    fx.GraphModule(fast, fast.graph).graph.lint()


class _Batched(nn.Module):
    """Attention-like scores through torch.baddbmm, the kind added through docs/contributing.md."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 64)
        self.bias = nn.Parameter(torch.zeros(1, 1, 16))
        self.out = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(torch.baddbmm(self.bias, h, h.transpose(1, 2)))


def test_baddbmm_is_costed_rewritten_sampled_in_training_and_exact_in_eval() -> None:
    torch.manual_seed(0)
    model, x = _Batched(), torch.randn(4, 16, 64)
    config = ApproxConfig(exclude_first_last=False).set_op_type(nn.Linear, NodeOverride(exact=True))
    fast = approxcompile.optimize(model, 0.85, example_inputs=(x,), config=config)
    (node,) = [n for n in approxcompile.report(fast).nodes if n.op == "baddbmm"]
    assert node.kind == "matmul" and node.inner == 64 and node.sampled
    assert node.flops.forward == 2 * 4 * 16 * 64 * 16
    assert "approxcompile_ops_sampled_baddbmm(" in fast.code
    fast.eval()
    assert torch.equal(fast(x), model(x))
    fast.train()
    assert not torch.allclose(fast(x), model(x))
    lowered = lower_for_export(fast)
    assert estimators.export_baddbmm in [n.target for n in lowered.module.graph.nodes]


def test_baddbmm_with_alpha_stays_exact_with_a_reason() -> None:
    class Scaled(_Batched):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            return self.out(torch.baddbmm(self.bias, h, h.transpose(1, 2), alpha=0.5))

    torch.manual_seed(0)
    fast = approxcompile.optimize(Scaled(), 1.0, example_inputs=(torch.randn(4, 16, 64),))
    (node,) = [n for n in approxcompile.report(fast).nodes if n.op == "baddbmm"]
    assert node.reason == "baddbmm with beta/alpha other than 1 is left exact" and node.flops.total > 0
