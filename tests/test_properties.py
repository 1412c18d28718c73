"""Property-based tests: for any small model hypothesis builds, optimize keeps its promises.

Generated models are stacks and branches of Linear / Conv1-3d / BatchNorm / activations /
residual blocks / attention, in float32, float64 or bfloat16, with frozen layers and tied
weights. For each one, ``optimize`` either raises a documented error (``BudgetError``) or
returns a module for which

- the user's model (parameters, buffers, training flags) and example inputs are unchanged,
- ``state_dict()`` keys are the model's and eval outputs are bit-for-bit the model's,
- a training step's gradients reach exactly the parameters the model's would,
- ``FlopCounterMode`` measures a training step within the budget (3% for what it cannot see),
- ``torch.save`` -> ``torch.load`` -> one more training step matches the unsaved module exactly.

The CI runs two fixed examples and a derandomised draw of ``APPROXCOMPILE_FUZZ_EXAMPLES``
more (default 4); ``make fuzz`` runs many more with fresh randomness.
"""

from __future__ import annotations

import copy
import io
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from torch import nn

import approxcompile
from approxcompile.errors import BudgetError
from approxcompile.passes import measure_step_flops

EXAMPLES = int(os.environ.get("APPROXCOMPILE_FUZZ_EXAMPLES", "4"))
FUZZ = "APPROXCOMPILE_FUZZ_EXAMPLES" in os.environ
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "none": lambda t: t}


@dataclass(frozen=True)
class Spec:
    """What to build: the input kind, the blocks, and the twists."""

    dims: int  # 0: tokens (B, T, F); 1-3: ConvNd over (B, C, *spatial)
    width: int
    blocks: tuple[tuple[str, str], ...]  # (block kind, activation)
    dtype: torch.dtype
    batch: int
    frozen: tuple[int, ...]  # block indices whose parameters are frozen
    tie: bool  # the second residual block reuses the first one's weights
    budget: float
    method: str


class Block(nn.Module):
    """One generated block over ``width`` features (dims=0) or channels (dims>0)."""

    def __init__(self, kind: str, act: str, dims: int, width: int) -> None:
        super().__init__()
        self.kind, self.act, self.dims = kind, act, dims
        if kind == "attention" and dims == 0:
            self.qkv = nn.Linear(width, 3 * width)
            self.proj = nn.Linear(width, width)
        elif dims == 0:
            self.a = nn.Linear(width, width)
            self.b = nn.Linear(width, width) if kind == "branch" else None
            self.norm = nn.LayerNorm(width) if kind == "residual" else None
        else:
            conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
            norm = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
            self.a = conv(width, width, 3, padding=1)
            self.b = conv(width, width, 1) if kind == "branch" else None
            self.norm = norm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.act]
        if self.kind == "attention" and self.dims == 0:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
            return x + self.proj(att @ v)
        h = self.a(x) if self.norm is None or self.dims == 0 else self.norm(self.a(x))
        if self.b is not None:
            h = h + self.b(x)
        if self.kind == "residual":
            h = x + (self.norm(h) if self.dims == 0 else h)
        return act(h)


class Generated(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.dims = spec.dims
        self.stem = nn.Linear(12, spec.width) if spec.dims == 0 else None
        if spec.dims:
            conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spec.dims - 1]
            self.stem_conv = conv(3, spec.width, 3, padding=1)
        self.blocks = nn.ModuleList(Block(kind, act, spec.dims, spec.width) for kind, act in spec.blocks)
        self.head = nn.Linear(spec.width, 5)
        residual = [b for b in self.blocks if b.kind in ("plain", "residual")]
        if spec.tie and len(residual) >= 2:
            residual[1].a.weight = residual[0].a.weight
        for i in spec.frozen:
            if i < len(self.blocks):
                self.blocks[i].requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x) if self.stem is not None else self.stem_conv(x)
        for block in self.blocks:
            x = block(x)
        pooled = x.mean(1) if self.dims == 0 else x.flatten(2).mean(-1)
        return self.head(pooled)


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    dims = draw(st.sampled_from((0, 0, 1, 2, 3)))
    kinds = ("plain", "residual", "branch", "attention") if dims == 0 else ("plain", "residual", "branch")
    n = draw(st.integers(1, 3))
    blocks = tuple(
        (draw(st.sampled_from(kinds)), draw(st.sampled_from(tuple(ACTIVATIONS)))) for _ in range(n)
    )
    return Spec(
        dims=dims,
        width=draw(st.sampled_from((16, 24, 32, 48))),
        blocks=blocks,
        dtype=draw(st.sampled_from(DTYPES)),
        batch=draw(st.integers(2, 6)),
        frozen=tuple(draw(st.sets(st.integers(0, n - 1), max_size=1))),
        tie=draw(st.booleans()),
        budget=draw(st.sampled_from((0.3, 0.5, 0.7, 0.9, 1.0))),
        method=draw(st.sampled_from(("topk", "topk", "crs", "bernoulli"))),
    )


def build(spec: Spec) -> tuple[Generated, torch.Tensor]:
    torch.manual_seed(0)
    model = Generated(spec).to(spec.dtype)
    shape = (spec.batch, 6, 12) if spec.dims == 0 else (spec.batch, 3, *([5] * spec.dims))
    return model, torch.randn(shape, dtype=spec.dtype)


def snapshot(model: nn.Module) -> dict[str, object]:
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    flags = {name: m.training for name, m in model.named_modules()}
    return {"state": state, "flags": flags, "grads": [p.grad for p in model.parameters()]}


def same(a: dict[str, object], b: dict[str, object]) -> bool:
    sa, sb = a["state"], b["state"]
    assert isinstance(sa, dict) and isinstance(sb, dict)
    return (
        sa.keys() == sb.keys()
        and all(torch.equal(sa[k], sb[k]) for k in sa)
        and a["flags"] == b["flags"]
        and all(g is None for g in b["grads"])  # type: ignore[union-attr]
    )


def reached(module: nn.Module, x: torch.Tensor) -> set[str]:
    """Names of the parameters a training step's loss has a gradient for."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    module.train()
    loss = module(x).float().square().mean()
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n for (n, _), g in zip(named, grads, strict=True) if g is not None}


def step(module: nn.Module, x: torch.Tensor, seed: int) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.01)
    module.train()
    module(x).float().square().mean().backward()
    opt.step()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not FUZZ,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(spec=specs())
# Always run, whatever the draws: bfloat16 attention with a frozen block, tied conv weights.
@example(
    spec=Spec(
        0, 32, (("attention", "gelu"), ("residual", "relu")), torch.bfloat16, 4, (1,), False, 0.5, "crs"
    )
)
@example(spec=Spec(2, 16, (("plain", "relu"), ("residual", "tanh")), torch.float32, 3, (), True, 0.6, "topk"))
def test_optimize_keeps_its_promises(spec: Spec) -> None:
    model, x = build(spec)
    x_before, before = x.clone(), snapshot(model)
    config = approxcompile.ApproxConfig(method=spec.method)
    try:
        fast = approxcompile.optimize(model, spec.budget, example_inputs=(x,), config=config)
    except BudgetError:
        event("BudgetError (documented)")
        assert same(before, snapshot(model)) and torch.equal(x, x_before)
        return
    event(f"dims={spec.dims} {spec.dtype} sampled={bool(approxcompile.report(fast).sampled)}")
    # The user's model and inputs are unchanged.
    assert same(before, snapshot(model)) and torch.equal(x, x_before)
    # Same keys, exact in eval.
    assert list(fast.state_dict()) == list(model.state_dict())
    model.eval()
    fast.eval()
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))
    # Gradients reach the same parameters (fast and model share them; BatchNorm statistics
    # move the same way in both runs, so run the model on a copy).
    assert reached(fast, x) == reached(copy.deepcopy(model), x)
    # What FlopCounterMode measures of a sampled training step stays within the budget.
    plan = approxcompile.report(fast).plan
    assert plan.fraction <= spec.budget * (1 + 1e-9)
    if plan.dense_flops:
        fast.train()
        assert measure_step_flops(fast, (x,)) <= spec.budget * plan.dense_flops * 1.03
    # save -> load -> continue training: identical to the module that was never saved.
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    loaded, reference = torch.load(buf, weights_only=False), copy.deepcopy(fast)
    assert list(loaded.state_dict()) == list(model.state_dict())
    step(loaded, x, seed=1)
    step(reference, x, seed=1)
    for (k, a), (_, b) in zip(loaded.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("dims", [0, 2])
def test_the_generator_builds_models_optimize_samples(dims: int) -> None:
    """The generated models are not trivially exact: at budget 0.5 some node is sampled."""
    spec = Spec(dims, 32, (("plain", "relu"), ("residual", "gelu")), torch.float32, 4, (), True, 0.5, "topk")
    model, x = build(spec)
    fast = approxcompile.optimize(model, spec.budget, example_inputs=(x,))
    assert approxcompile.report(fast).sampled
    assert model.blocks[1].a.weight is model.blocks[0].a.weight  # tied
