"""Nothing the user owns is changed, what is saved loads, bad input gets a clear error (issue 13).

Each test failed before its fix; the comment above it says how.
"""

from __future__ import annotations

import copy
import io
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, prune

import approxcompile
from approxcompile import ApproxConfig, NodeOverride
from approxcompile.errors import BudgetError, DoubleBackwardError, ExampleInputError, NonFiniteError
from approxcompile.module import ApproxModule
from tests.models import CNN, MLP

X = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
XC = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
SIZES = (32, 64, 64, 64, 8)


def small_mlp() -> MLP:
    torch.manual_seed(0)
    return MLP(SIZES)


def small_cnn() -> CNN:
    torch.manual_seed(0)
    return CNN(channels=16)


def train_steps(module: nn.Module, x: torch.Tensor, steps: int = 2, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    module.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = module(x).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# -- 1. saving: torch.save(fast) used to write a corrupt file (MLP) or fail on load (CNN) --------


@pytest.mark.parametrize("make, x", [(small_mlp, X), (small_cnn, XC)], ids=["mlp", "cnn"])
def test_torch_save_load_and_pickle_round_trip_continue_training_identically(make, x) -> None:
    fast = approxcompile.optimize(make(), 0.6, example_inputs=(x,))
    assert isinstance(fast, ApproxModule) and approxcompile.report(fast).sampled
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    for loaded in (
        torch.load(buf, weights_only=False),
        pickle.loads(pickle.dumps(fast)),
        copy.deepcopy(fast),
    ):
        assert isinstance(loaded, ApproxModule)
        assert loaded.code == fast.code
        assert approxcompile.report(loaded).plan == approxcompile.report(fast).plan
        ref = copy.deepcopy(fast)  # the same starting point for the reference run
        assert train_steps(loaded, x, seed=3) == train_steps(ref, x, seed=3)
        for (k, a), (_, b) in zip(loaded.state_dict().items(), ref.state_dict().items(), strict=True):
            assert torch.equal(a, b), k


def test_a_loaded_module_is_standalone() -> None:
    model = small_mlp()
    fast = approxcompile.optimize(model, 0.6, example_inputs=(X,))
    loaded = pickle.loads(pickle.dumps(fast))
    before = model.layers[0].weight.clone()
    train_steps(loaded, X)
    assert torch.equal(model.layers[0].weight, before)


# -- 2. .double() / .half() / .to(): BatchNorm buffers used to be replaced in fast only --------


@pytest.mark.parametrize("convert", ["double", "half"])
def test_dtype_conversion_of_fast_converts_the_model(convert: str) -> None:
    model = small_cnn()
    fast = approxcompile.optimize(model, 0.6, example_inputs=(XC,))
    getattr(fast, convert)()
    dtype = torch.float64 if convert == "double" else torch.float16
    assert model.bn.running_mean.dtype == dtype and model.conv1.weight.dtype == dtype
    assert model.bn.running_mean is fast.bn.running_mean
    if convert == "double":
        train_steps(fast, XC.double(), steps=1)
        model.eval()
        fast.eval()
        assert torch.equal(model(XC.double()), fast(XC.double()))  # raised a dtype error before


def test_model_to_converts_fast_and_training_updates_the_models_statistics() -> None:
    model = small_cnn()
    fast = approxcompile.optimize(model, 0.6, example_inputs=(XC,))
    model.double()
    assert fast.bn.running_var.dtype == torch.float64
    train_steps(fast, XC.double(), steps=2)
    for (k, a), (_, b) in zip(model.state_dict().items(), fast.state_dict().items(), strict=True):
        assert a.data_ptr() == b.data_ptr(), k  # one set of tensors
    assert int(model.bn.num_batches_tracked) == 2


# -- 3. planning used to run forward on the caller's buffers and example inputs ----------------


class Counting(nn.Module):
    """Counts the rows it has seen and scales its input in place."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 8)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        x = x.mul_(2)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def test_optimize_changes_neither_buffers_nor_inputs_nor_the_rng() -> None:
    model, x = Counting(), X.clone()
    state = torch.get_rng_state()
    fast = approxcompile.optimize(model, 0.6, example_inputs=(x,))  # VerificationError before
    assert int(model.seen) == 0 and torch.equal(x, X)
    assert torch.equal(torch.get_rng_state(), state)
    fast(X.clone())
    assert int(model.seen) == 16  # after optimize, fast and model share the buffer


# -- 4. hooks: shared dicts, sampled layers silent, user hooks fired during optimize -----------


def test_hooks_stay_on_their_own_side_and_do_not_fire_during_optimize() -> None:
    model = small_cnn()
    seen: list[str] = []
    model.conv1.register_forward_hook(lambda *a: seen.append("model.conv1"))
    fast = approxcompile.optimize(model, 0.6, example_inputs=(XC,))
    assert seen == []  # fired three times before
    fast.head.register_forward_hook(lambda *a: seen.append("fast.head"))
    model.head.register_forward_hook(lambda *a: seen.append("model.head"))
    model(XC)
    assert seen == ["model.conv1", "model.head"]  # fast.head's hook fired here before
    seen.clear()
    fast(XC)
    assert seen == ["model.conv1", "fast.head"]  # conv1 is exact (first node): its copied hook runs


def test_a_hook_on_a_layer_that_gets_sampled_is_reported() -> None:
    model = small_mlp()
    model.layers[1].register_forward_hook(lambda *a: None)
    with pytest.warns(UserWarning, match=r"layers\.1 has hooks .* will not fire"):
        approxcompile.optimize(model, 0.6, example_inputs=(X,))


# -- 6. autocast: 'expected m1 and m2 to have the same dtype' in backward ----------------------


@pytest.mark.parametrize("mode", ["forward", "backward"])
@pytest.mark.parametrize("make, x", [(small_mlp, X), (small_cnn, XC)], ids=["mlp", "cnn"])
def test_cpu_bf16_autocast_trains_with_pytorchs_dtype_rules(mode: str, make, x) -> None:
    model = make()
    method = "bernoulli" if mode == "backward" else "topk"
    fast = approxcompile.optimize(
        model, 0.7, example_inputs=(x,), config=ApproxConfig(method=method, mode=mode)
    )
    assert approxcompile.report(fast).sampled
    with torch.autocast("cpu", torch.bfloat16):
        want = model.eval()(x)
        fast.eval()
        assert torch.equal(fast(x), want)
        fast.train()
        y = fast(x)
    assert y.dtype == want.dtype == torch.bfloat16
    y.float().square().mean().backward()
    for name, p in fast.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["forward", "backward"])
def test_cuda_fp16_autocast_takes_the_same_path(mode: str) -> None:
    model, x = small_cnn().cuda(), XC.cuda()
    method = "bernoulli" if mode == "backward" else "topk"
    fast = approxcompile.optimize(
        model, 0.7, example_inputs=(x,), config=ApproxConfig(method=method, mode=mode)
    )
    with torch.autocast("cuda", torch.float16):
        y = fast.train()(x)
    assert y.dtype == torch.float16
    y.float().square().mean().backward()
    assert all(p.grad.dtype == torch.float32 for p in fast.parameters())


# -- 7. zero-size batch: 'cannot reshape tensor of 0 elements', ZeroDivisionError -------------


@pytest.mark.parametrize("mode", ["forward", "backward"])
@pytest.mark.parametrize("make, x", [(small_mlp, X), (small_cnn, XC)], ids=["mlp", "cnn"])
def test_an_empty_batch_trains(mode: str, make, x) -> None:
    model = make()
    method = "bernoulli" if mode == "backward" else "topk"
    fast = approxcompile.optimize(
        model, 0.7, example_inputs=(x,), config=ApproxConfig(method=method, mode=mode)
    )
    fast.train()
    y = fast(x[:0])
    assert y.shape == (0, 8 if make is small_mlp else 10)
    y.sum().backward()


def test_every_sampled_op_takes_an_empty_batch() -> None:
    from approxcompile import ops

    a, b = torch.randn(0, 4, 32, requires_grad=True), torch.randn(0, 32, 5)
    ops.sampled_baddbmm(torch.zeros(0, 4, 5), a, b, keep=0.5).sum().backward()
    ops.sampled_matmul(a, b, keep=0.5).sum().backward()
    ops.sampled_linear(torch.randn(0, 32, requires_grad=True), torch.randn(8, 32), keep=0.5).sum().backward()


def test_an_empty_example_batch_is_refused_clearly() -> None:
    with pytest.raises(ExampleInputError, match="empty"):
        approxcompile.optimize(small_mlp(), 0.6, example_inputs=(X[:0],))


# -- 8. NaN / Inf: 'VerificationError ... please report this' -----------------------------------


def test_nan_weights_and_inf_inputs_are_named() -> None:
    model = small_mlp()
    with torch.no_grad():
        model.layers[1].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"layers\.1\.weight.*NaN"):
        approxcompile.optimize(model, 0.6, example_inputs=(X,))
    x = X.clone()
    x[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="example input 0.*Inf"):
        approxcompile.optimize(small_mlp(), 0.6, example_inputs=(x,))


# -- 9. weight_norm / spectral_norm / pruning: raw AttributeError ------------------------------


@pytest.mark.parametrize(
    "wrap, why",
    [
        (lambda m: torch.nn.utils.weight_norm(m), "pre-hook"),
        (lambda m: torch.nn.utils.spectral_norm(m), "pre-hook"),
        (lambda m: prune.l1_unstructured(m, "weight", 0.3), "pre-hook"),
        (lambda m: parametrizations.weight_norm(m), "parametrized"),
    ],
    ids=["weight_norm", "spectral_norm", "prune", "parametrizations.weight_norm"],
)
def test_layers_with_computed_weights_stay_exact_and_train(wrap, why: str) -> None:
    model = small_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        wrap(model.layers[2])
    fast = approxcompile.optimize(model, 0.8, example_inputs=(X,))
    node = next(n for n in approxcompile.report(fast).nodes if n.name == "layers.2")
    assert not node.sampled and why in (node.reason or "")
    assert approxcompile.report(fast).sampled  # the others still are
    train_steps(fast, X, steps=1)
    model.eval()
    fast.eval()
    assert torch.equal(model(X), fast(X))


# -- 10. double backward: 'mm(): functions with out=... don't support automatic differentiation' --


def test_double_backward_through_a_sampled_op_is_refused_clearly() -> None:
    fast = approxcompile.optimize(small_mlp(), 0.6, example_inputs=(X,))
    x = X.clone().requires_grad_()
    with pytest.raises(DoubleBackwardError, match="create_graph=True"):
        torch.autograd.grad(fast.train()(x).sum(), x, create_graph=True)
    (g,) = torch.autograd.grad(fast.eval()(x).sum(), x, create_graph=True)
    g.square().sum().backward()  # exact ops in eval(): works


# -- 11. a budget a hair below the smallest feasible; numpy floats -----------------------------


def test_a_budget_at_the_feasibility_edge_and_numpy_budgets() -> None:
    with pytest.raises(BudgetError) as info:
        approxcompile.optimize(small_mlp(), 0.01, example_inputs=(X,))
    edge = info.value.smallest_feasible
    assert edge is not None
    fast = approxcompile.optimize(
        small_mlp(), edge * (1 - 2e-10), example_inputs=(X,)
    )  # min() of empty before
    assert approxcompile.report(fast).plan.fraction <= edge * (1 + 1e-9)
    for budget in (np.float32(0.6), np.float64(0.6)):
        assert approxcompile.report(approxcompile.optimize(small_mlp(), budget, example_inputs=(X,))).sampled


# -- 12. keyword-only forward, optional mask=None, example_inputs=None or a generator -----------


class KeywordOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = small_mlp()

    def forward(self, *, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = small_mlp()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            x = x * mask
        return self.net(x)


def test_keyword_only_forward_takes_a_dict_and_a_tuple_fails_before_any_work() -> None:
    model = KeywordOnly()
    with pytest.raises(ExampleInputError, match=r"keyword-only inputs as a dict.*'x'"):
        approxcompile.optimize(model, 0.6, example_inputs=(X,))
    fast = approxcompile.optimize(model, 0.6, example_inputs={"x": X})
    assert approxcompile.report(fast).sampled
    assert torch.equal(fast.eval()(x=X), model.eval()(x=X))


def test_an_optional_none_argument_left_out_is_fixed_to_none() -> None:
    model = Masked()
    fast = approxcompile.optimize(model, 0.6, example_inputs=(X,))  # misleading ExampleInputError before
    assert torch.equal(fast.eval()(X), model.eval()(X))
    with pytest.raises(AssertionError, match="specialized to have value None"):
        fast(X, torch.ones_like(X))
    fast = approxcompile.optimize(model, 0.6, example_inputs=(X, torch.ones_like(X)))
    assert torch.equal(fast.eval()(X, 2 * torch.ones_like(X)), model.eval()(X, 2 * torch.ones_like(X)))


def test_example_inputs_none_or_a_generator() -> None:
    with pytest.raises(ExampleInputError, match=r"needs example inputs.*example_inputs=\(x,\)"):
        approxcompile.optimize(small_mlp(), 0.6, example_inputs=None)
    fast = approxcompile.optimize(small_mlp(), 0.6, example_inputs=(t for t in [X]))
    assert approxcompile.report(fast).sampled


# -- 13. configuration: raw errors late, or accepted silently ----------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seed": "a"}, "seed must be an integer"),
        ({"seed": 2**64}, "seed must fit in 64 bits"),
        ({"seed": True}, "seed must be an integer"),
        ({"min_k": 2.5}, "min_k must be an integer"),
        ({"align": None}, "align must be an integer"),
        ({"min_inner": 0}, "min_inner must be >= 1"),
        ({"keep_grid": ()}, "keep_grid must be a non-empty"),
        ({"eps": "0.1"}, "eps must be a number"),
        ({"exclude_first_last": "no"}, "exclude_first_last must be True or False"),
    ],
)
def test_bad_config_fields_fail_where_they_are_written(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ApproxConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"exact": "yes"}, "exact must be True or False"),
        ({"keep": True}, "keep must be a number"),
        ({"min_k": 1.5}, "min_k"),
    ],
)
def test_bad_override_fields_fail_where_they_are_written(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NodeOverride(**kwargs)


def test_an_override_may_be_a_dict_and_bad_ones_fail_at_once() -> None:
    cfg = ApproxConfig().set_module_name("layers.1", {"exact": True})
    assert cfg.module_name_overrides == (("layers.1", NodeOverride(exact=True)),)
    with pytest.raises(ValueError, match="unknown override field"):
        ApproxConfig().set_module_name("layers.1", {"exakt": True})
    with pytest.raises(TypeError, match="NodeOverride or a dict"):
        ApproxConfig().set_module_name_regex("layers.*", True)  # type: ignore[arg-type]
    fast = approxcompile.optimize(small_mlp(), 0.7, example_inputs=(X,), config=cfg)
    assert next(n for n in approxcompile.report(fast).nodes if n.name == "layers.1").reason.startswith(
        "left exact"
    )


def test_an_override_that_matches_nothing_warns_with_the_closest_names() -> None:
    cfg = ApproxConfig().set_module_name("layer.1", NodeOverride(exact=True))
    cfg = cfg.set_module_name_regex(r"head\..*", NodeOverride(keep=0.5))
    with pytest.warns(UserWarning) as record:
        approxcompile.optimize(small_mlp(), 0.7, example_inputs=(X,), config=cfg)
    messages = [str(w.message) for w in record]
    assert any("'layer.1' matched no" in m and "layers.1" in m for m in messages)
    assert any(r"'head\\..*' matched no" in m for m in messages)


# -- 16. CLI: --input-shape 0,64 / huge shapes printed a traceback; --seed did not name the option --


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--input-shape", "0,32"], "argument --input-shape: bad shape '0,32': dimensions must be >= 1"),
        (["--input-shape", "100000000,100000"], "argument --input-shape: shape .* elements, more than"),
        (["--input-shape", "8,32", "--seed", "1e23"], "argument --seed: bad seed '1e23'"),
        (
            ["--input-shape", "8,32", "--seed", str(10**23)],
            "argument --seed: seed .* does not fit in 64 bits",
        ),
    ],
)
def test_cli_bad_shapes_and_seeds_are_one_line_naming_the_option(
    capsys, extra: list[str], match: str
) -> None:
    from approxcompile.cli import main

    assert main(["inspect", "tests.models:mlp", *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert re.search(match, err), err


def test_cli_an_input_too_large_to_allocate_is_one_line(capsys, monkeypatch) -> None:
    from approxcompile import cli

    def no_memory(*args, **kwargs):
        raise RuntimeError(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 36000000000 bytes"
        )

    monkeypatch.setattr(cli.torch, "randn", no_memory)
    assert cli.main(["inspect", "tests.models:mlp", "--input-shape", "3000000,3000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("approxcompile: error: argument --input-shape: cannot create an example input")
