"""optimize() end to end: the rewrite happens, eval stays exact, checkpoints and FLOPs agree."""

from __future__ import annotations

import copy
import io
import textwrap

import pytest
import torch
from torch import nn

import approxcompile
from approxcompile import ApproxConfig, NodeOverride, ops
from approxcompile.passes import measure_step_flops
from approxcompile.plan import META_KEY
from tests.models import attention, cnn, mlp

HALF = (
    ApproxConfig().set_op_type("linear", NodeOverride(keep=0.5)).set_op_type("conv", NodeOverride(keep=0.5))
)
X_MLP = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
X_CNN = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
X_ATT = torch.randn(4, 12, 32, generator=torch.Generator().manual_seed(0))
MODELS = {"mlp": (mlp, X_MLP), "cnn": (cnn, X_CNN), "attention": (attention, X_ATT)}


def _op_calls(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ops.SAMPLED_OPS]


def _sampled_calls(gm: torch.fx.GraphModule) -> list[str]:
    """The sampled-op calls that sample (``keep=1.0`` calls run the exact op)."""
    return [n.name for n in _op_calls(gm) if n.kwargs["keep"] < 1.0]


def _code(gm: torch.fx.GraphModule) -> str:
    return textwrap.dedent(gm.code).strip()


GOLDEN_CNN = """
def forward(self, x : _torch_Tensor_) -> _torch_Tensor_:
    training = self.training
    conv1_weight = self.conv1.weight
    conv1_bias = self.conv1.bias
    sampled_conv = approxcompile_ops_sampled_conv(x, conv1_weight, conv1_bias, (1, 1), (1, 1), (1, 1), keep = 1.0, method = 'topk', training = training, live = 16);  x = conv1_weight = conv1_bias = None
    relu = torch.nn.functional.relu(sampled_conv, inplace = False);  sampled_conv = None
    conv2_weight = self.conv2.weight
    conv2_bias = self.conv2.bias
    sampled_conv_1 = approxcompile_ops_sampled_conv(relu, conv2_weight, conv2_bias, (1, 1), (1, 1), (1, 1), keep = 0.5, method = 'topk', training = training);  relu = conv2_weight = conv2_bias = None
    relu_1 = torch.nn.functional.relu(sampled_conv_1, inplace = False);  sampled_conv_1 = None
    conv3_weight = self.conv3.weight
    conv3_bias = self.conv3.bias
    sampled_conv_2 = approxcompile_ops_sampled_conv(relu_1, conv3_weight, conv3_bias, (1, 1), (1, 1), (1, 1), keep = 0.5, method = 'topk', training = training);  relu_1 = conv3_weight = conv3_bias = None
    bn = self.bn(sampled_conv_2);  sampled_conv_2 = None
    relu_2 = torch.nn.functional.relu(bn, inplace = False);  bn = None
    mean = relu_2.mean(dim = (2, 3));  relu_2 = None
    head_weight = self.head.weight
    head_bias = self.head.bias
    sampled_linear = approxcompile_ops_sampled_linear(mean, head_weight, head_bias, keep = 0.5, method = 'topk', training = training);  mean = head_weight = head_bias = training = None
    return sampled_linear
"""  # noqa: E501

GOLDEN_MLP_LAYER = (
    "sampled_linear_1 = approxcompile_ops_sampled_linear(relu, layers_1_weight, layers_1_bias, "
    "keep = 0.5, method = 'topk', training = training)"
)


def test_golden_code_cnn() -> None:
    fast = approxcompile.optimize(cnn(), 0.9, example_inputs=(X_CNN,), config=HALF)
    assert _code(fast) == GOLDEN_CNN.strip()
    # conv1 has one input channel: too small to sample. It feeds the sampled conv2, so it is
    # an exact keep=1.0 call (its backward skips the channels conv2 left without gradient),
    # with live = 16: conv2 keeps 16 of its 32 input channels, which reach it through a ReLU.
    assert _sampled_calls(fast) == ["sampled_conv_1", "sampled_conv_2", "sampled_linear"]
    assert [n.name for n in _op_calls(fast) if n.kwargs["keep"] == 1.0] == ["sampled_conv"]


def test_golden_code_mlp() -> None:
    fast = approxcompile.optimize(mlp(), 0.9, example_inputs=(X_MLP,), config=HALF)
    code = _code(fast)
    assert code.startswith(
        "def forward(self, x : _torch_Tensor_) -> _torch_Tensor_:\n    training = self.training"
    )
    assert GOLDEN_MLP_LAYER in code
    assert len(_sampled_calls(fast)) == 4 and "self.layers" not in code.replace("getattr(self.layers", "")


@pytest.mark.parametrize("name", MODELS)
def test_default_budget_rewrites_middle_nodes_only(name: str) -> None:
    factory, x = MODELS[name]
    fast = approxcompile.optimize(factory(), 0.4, example_inputs=(x,))
    plan = fast.meta[META_KEY]
    assert plan.nodes[0].reason.startswith("first") or "too small" in plan.nodes[0].reason
    assert plan.nodes[-1].reason.startswith("last")
    assert _sampled_calls(fast), "budget=0.4 must sample something"
    assert len(_sampled_calls(fast)) == sum(n.sampled for n in plan.nodes)
    assert plan.fraction <= 0.4 + 1e-9


@pytest.mark.parametrize("name", MODELS)
def test_eval_outputs_equal_the_original(name: str) -> None:
    factory, x = MODELS[name]
    model = factory()
    fast = approxcompile.optimize(model, 0.5, example_inputs=(x,))
    model.eval()
    fast.eval()
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))
        fast.train()
        assert not torch.equal(fast(x), model(x)), "train mode must sample"


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_is_the_original_and_checkpoints_load_back(name: str) -> None:
    factory, x = MODELS[name]
    model = factory()
    fast = approxcompile.optimize(model, 0.4, example_inputs=(x,))
    ours, theirs = fast.state_dict(), model.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k] is theirs[k] or torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(p is q for p, q in zip(fast.parameters(), model.parameters(), strict=True))
    buf = io.BytesIO()
    torch.save(fast.state_dict(), buf)
    buf.seek(0)
    fresh = factory()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    fresh.load_state_dict(torch.load(buf))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), theirs.values(), strict=True))


def test_training_the_rewrite_trains_the_users_parameters() -> None:
    model = mlp()
    fast = approxcompile.optimize(model, 0.4, example_inputs=(X_MLP,))
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(fast.parameters(), lr=0.1)
    fast.train()
    fast(X_MLP).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(model.layers[1].weight, before["layers.1.weight"])


def test_optimize_does_not_mutate_the_model() -> None:
    model = cnn()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    fast = approxcompile.optimize(model, 0.4, example_inputs=(X_CNN,))
    fast.train()
    assert dict(model.named_modules()) == modules
    assert not any(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats too
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("budget", [0.2, 0.4, 0.7])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_flop_count_agrees_with_flop_counter_mode(name: str, budget: float) -> None:
    factory, x = MODELS[name]
    x = torch.cat([x] * 4)  # a batch big enough that the first/last layers do not dominate
    model = factory()
    config = ApproxConfig(exclude_first_last=False)  # so that 0.2 is feasible on small models
    fast = approxcompile.optimize(model, budget, example_inputs=(x,), config=config)
    plan = fast.meta[META_KEY]
    fast.train()
    measured, dense = measure_step_flops(fast, (x,)), measure_step_flops(model, (x,))
    assert plan.dense_flops == pytest.approx(dense, rel=0.02)
    assert plan.counted_flops == pytest.approx(measured, rel=0.03)
    assert measured / dense <= budget  # overhead is charged too, so the products alone fit
    assert plan.fraction <= budget + 1e-9


def test_budget_one_leaves_the_model_unchanged() -> None:
    fast = approxcompile.optimize(mlp(), 1.0, example_inputs=(X_MLP,))
    assert _sampled_calls(fast) == []
    assert all(n.reason for n in fast.meta[META_KEY].nodes)


def test_model_without_candidates_is_returned_unchanged_with_a_note() -> None:
    model = nn.Sequential(nn.ReLU(), nn.Tanh())
    fast = approxcompile.optimize(model, 0.4, example_inputs=(X_MLP,))
    assert _sampled_calls(fast) == [] and fast.meta[META_KEY].note.startswith("no matmul")
    assert torch.equal(fast(X_MLP), model(X_MLP))


def test_overrides_follow_qconfigmapping_precedence() -> None:
    config = (
        ApproxConfig(exclude_first_last=False)
        .set_op_type("linear", NodeOverride(keep=0.5, method="crs"))
        .set_module_name_regex(r"layers\.[12]", NodeOverride(keep=0.25))
        .set_module_name("layers.2", NodeOverride(exact=True))
    )
    fast = approxcompile.optimize(mlp(), 0.9, example_inputs=(X_MLP,), config=config)
    plans = {p.name: p for p in fast.meta[META_KEY].nodes}
    assert (plans["layers.0"].keep, plans["layers.0"].method) == (0.5, "crs")  # op type
    assert (plans["layers.1"].keep, plans["layers.1"].method) == (0.25, "crs")  # regex beats op type
    assert not plans["layers.2"].sampled and "override" in plans["layers.2"].reason  # name beats regex


def test_rewrite_is_idempotent_and_reports_modified() -> None:
    from approxcompile import passes

    fast = approxcompile.optimize(mlp(), 0.4, example_inputs=(X_MLP,))
    code = fast.code
    again = passes.rewrite(fast, ApproxConfig())
    assert again.modified is False and fast.code == code
    unchanged = approxcompile.optimize(mlp(), 1.0, example_inputs=(X_MLP,))
    assert passes.rewrite(unchanged, ApproxConfig()).modified is False


@pytest.mark.parametrize("method", ["topk", "crs", "bernoulli", "uniform"])
def test_each_method_trains_only_the_kept_columns(method: str) -> None:
    fast = approxcompile.optimize(attention(), 0.5, example_inputs=(X_ATT,), method=method)
    sampled = [p for p in fast.meta[META_KEY].nodes if p.sampled]
    assert sampled and {p.method for p in sampled} == {method}
    fast.train()
    fast(X_ATT).sum().backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in fast.parameters())
    # a sampled Linear's weight gradient is zero outside the input features kept this step
    layers = [p for p in sampled if p.op == "Linear"]
    assert layers, [p.name for p in sampled]
    for node in layers:
        touched = int((fast.get_parameter(f"{node.name}.weight").grad != 0).any(0).sum())
        if method == "bernoulli":  # a random count, k in expectation
            assert 0 < touched < node.inner, (node.name, touched)
        else:  # exactly k (topk, uniform) or at most k distinct (crs) columns
            assert 0 < touched <= node.k < node.inner, (node.name, touched, node.k)
