"""What the sampled linear product's backward allocates and fills, op by op.

Its gathered input slice ``xs`` is a second output of the custom op, marked
non-differentiable. Autograd by default hands a backward a zero-filled gradient for every
output that got none, so each step zero-filled an ``(m, k)`` tensor nobody reads (0.1-1 ms
per layer at transformer sizes). These tests log the aten calls of one backward.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from approxcompile.ops import sampled_linear
from tests import reference

aten = torch.ops.aten
ZERO_FILLS = {aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default, aten.zero_.default}


class _ZeroFills(TorchDispatchMode):
    """Records the ops called outside the custom ops' kernels, and the shapes zero-fills produce.

    The mode is off inside an op it intercepts, so the workspace zeroing inside
    ``sampled_linear_product_backward`` is not seen; autograd's own calls are.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Any] = []
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.ops.append(func)
        if func in ZERO_FILLS:
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.usefixtures("general_linear")
@pytest.mark.parametrize("bias", [True, False])
def test_linear_backward_fills_no_zero_gradient_for_the_sampled_slice(bias: bool) -> None:
    torch.manual_seed(0)
    m, n, p, k = 24, 40, 12, 10  # keep 0.25 of 40
    x = torch.randn(m, n, requires_grad=True)
    w = torch.randn(p, n, requires_grad=True)
    b = torch.randn(p, requires_grad=True) if bias else None
    y = sampled_linear(x, w, b, keep=0.25, generator=torch.Generator().manual_seed(3))
    with _ZeroFills() as log:
        y.pow(2).sum().backward()
    assert torch.ops.approxcompile.sampled_linear_product_backward.default in log.ops  # the fast kernel ran
    assert log.shapes == []  # no (m, k) zeros for the non-differentiable slice output
    kept = int((w.grad != 0).any(0).sum())
    assert kept == k  # really sampled: k of n weight columns got a gradient


def test_linear_backward_without_materialised_grads_matches_the_reference() -> None:
    """Leaving the unused gradient unset changes no value (topk: no scale, exact indices)."""
    torch.manual_seed(1)
    x = torch.randn(3, 5, 48, requires_grad=True)
    w, b = torch.randn(7, 48, requires_grad=True), torch.randn(7, requires_grad=True)
    y = sampled_linear(x, w, b, keep=0.3, method="topk")
    y.pow(2).sum().backward()
    got = (x.grad.clone(), w.grad.clone(), b.grad.clone())
    x.grad = w.grad = b.grad = None
    reference.linear(x, w, b, 14, "topk", seed=0).pow(2).sum().backward()
    for g, want in zip(got, (x.grad, w.grad, b.grad), strict=True):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "small linear", "conv"])
def test_plain_eager_calls_skip_the_dispatcher_with_the_same_results(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a plain eager call takes the kernels directly; under a mode the ops run, same values.

    Direct: the draw and the backward kernels, and the forward product through a plain
    ``autograd.Function`` (its node names the Function, not the op's generated wrapper):
    ``ops.small``'s for a small linear, the general kernel's for a linear of any size.
    """
    from approxcompile.ops import small

    if kind == "linear":
        monkeypatch.setattr(small, "SMALL_GRADIENT", 0)
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from approxcompile.ops import sampled_conv
    from approxcompile.ops.eager import direct

    t = torch.randn(3)
    assert direct(t, torch.nn.Parameter(t), None)
    with FakeTensorMode():
        assert not direct(t)
    with FlopCounterMode(display=False):
        assert not direct(t)
    ops = torch.ops.approxcompile
    product, backward = (
        (ops.sampled_linear_product, ops.sampled_linear_product_backward)
        if kind != "conv"
        else (ops.sampled_conv_product, ops.sampled_conv_product_backward)
    )

    def grads(mode: bool) -> tuple[torch.Tensor, ...]:
        shape, w_shape = ((6, 40), (12, 40)) if kind != "conv" else ((2, 8, 5, 5), (4, 8, 3, 3))
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        w = torch.randn(w_shape, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        g = torch.Generator().manual_seed(3)
        with _ZeroFills() if mode else contextlib.nullcontext() as log:
            if kind != "conv":
                y = sampled_linear(x, w, None, keep=0.25, method="crs", generator=g)
            else:
                y = sampled_conv(x, w, None, 1, 1, keep=0.25, method="crs", generator=g)
            node = type(y.grad_fn).__name__
            y.pow(2).sum().backward()
        if mode:
            assert log is not None and torch.ops.approxcompile.draw.default in log.ops
            assert product.default in log.ops and backward.default in log.ops
        else:
            want = "_Small" if kind == "small linear" else "_Eager"
            assert node.startswith(want), node  # not the custom op's generated autograd node
        assert x.grad is not None and w.grad is not None
        return y.detach(), x.grad, w.grad

    for a, b in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
