"""Every bad input gets a clear error, and the user's model is left as it was."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import approxcompile
from approxcompile import ApproxConfig, BudgetError, ExampleInputError, NodeOverride, TraceError
from tests.models import mlp

X = torch.randn(8, 64)


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.01, math.nan, math.inf, "0.4", True])
def test_budget_outside_zero_one_is_a_value_error(budget: object) -> None:
    with pytest.raises(ValueError, match="budget"):
        approxcompile.optimize(mlp(), budget, example_inputs=(X,))  # type: ignore[arg-type]


def test_budget_below_the_exact_nodes_states_the_smallest_feasible_one() -> None:
    with pytest.raises(BudgetError, match=r"smallest feasible budget is 0\.\d{3}") as info:
        approxcompile.optimize(mlp(), 0.05, example_inputs=(X,))
    smallest = float(str(info.value).rsplit(" ", 1)[-1])
    assert 0.05 < smallest < 1
    approxcompile.optimize(mlp(), smallest, example_inputs=(X,))  # the stated budget works


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow
            return self.fc(x)
        return -self.fc(x)


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(64, 64), nn.Linear(64, 64), Branchy(), nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(self.c(self.b(self.a(x))))


def test_untraceable_model_names_the_code_and_suggests_a_leaf_module() -> None:
    with pytest.raises(TraceError) as info:
        approxcompile.optimize(Holder(), 0.5, example_inputs=(X,), config=ApproxConfig(frontend="fx"))
    msg = str(info.value)
    assert "if x.sum() > 0" in msg and "test_errors.py" in msg
    assert "leaf_modules=(Branchy,)" in msg
    assert info.value.__cause__ is not None
    fast = approxcompile.optimize(
        Holder(), 0.9, example_inputs=(X,), config=ApproxConfig(leaf_modules=(Branchy,), frontend="fx")
    )
    assert any(n.op == "call_module" and n.target == "c" for n in fast.graph.nodes)


def test_untraceable_root_suggests_moving_the_code_into_a_submodule() -> None:
    with pytest.raises(TraceError, match="move the data-dependent code into a submodule"):
        approxcompile.optimize(Branchy(), 0.5, example_inputs=(X,), config=ApproxConfig(frontend="fx"))


def test_example_inputs_that_do_not_fit_give_the_models_error_with_context() -> None:
    with pytest.raises(ExampleInputError) as info:
        approxcompile.optimize(mlp(), 0.5, example_inputs=(torch.randn(8, 63),))
    msg = str(info.value)
    assert "layers.0" in msg and "Tensor(8, 63)" in msg and "mat1 and mat2" in msg
    assert isinstance(info.value.__cause__, RuntimeError)


def test_example_inputs_must_be_a_tuple() -> None:
    with pytest.raises(ExampleInputError, match="tuple"):
        approxcompile.optimize(mlp(), 0.5, example_inputs=X)  # type: ignore[arg-type]


def test_not_a_module() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        approxcompile.optimize(lambda x: x, 0.5, example_inputs=(X,))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: ApproxConfig(method="random"),
            r"unknown sampling method 'random'; expected one of \('topk'",
        ),
        (
            lambda: ApproxConfig(keep_grid=(0.5, 1.5)),
            r"every keep_grid entry must be a number in \(0, 1\], got 1.5",
        ),
        (lambda: ApproxConfig(eps=1.0), r"eps must be a number in \[0, 1\), got 1.0"),
        (
            lambda: ApproxConfig(min_k=0),
            "min_k must be >= 1, got 0",
        ),
        (lambda: NodeOverride(keep=0.0), r"keep must be a number in \(0, 1\], got 0.0"),
        (lambda: NodeOverride(method="top"), "unknown sampling method 'top'"),
        (lambda: NodeOverride(min_k=-1), "NodeOverride.min_k must be >= 1, got -1"),
        (
            lambda: ApproxConfig().set_op_type("softmax", NodeOverride(exact=True)),
            r"unknown op type 'softmax'; expected one of \('linear', 'matmul', 'conv', 'attention'\)",
        ),
        (
            lambda: ApproxConfig().set_module_name_regex("(", NodeOverride(exact=True)),
            r"invalid module-name regex '\('",
        ),
        (
            lambda: approxcompile.optimize(mlp(), 0.5, example_inputs=(X,), method="fast"),
            "unknown sampling method 'fast'",
        ),
    ],
)
def test_bad_configuration_is_rejected_up_front(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_leaf_modules_must_be_module_types() -> None:
    with pytest.raises(TypeError, match="leaf_modules"):
        ApproxConfig(leaf_modules=(nn.Linear(2, 2),))  # type: ignore[arg-type]


def test_zero_weights_and_dead_relus_train_to_finite_values() -> None:
    model = mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    for method in ("topk", "crs", "bernoulli", "uniform"):
        fast = approxcompile.optimize(model, 0.5, example_inputs=(X,), method=method)
        fast.train()
        out = fast(X)
        out.sum().backward()
        assert bool(torch.isfinite(out).all())
        assert all(bool(torch.isfinite(p.grad).all()) for p in fast.parameters())
        fast.zero_grad()
