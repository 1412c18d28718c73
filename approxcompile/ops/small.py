"""The sampled linear product of small layers in plain eager calls: the fewest operations per step.

Why: on a small layer the sampled product's fixed work decides whether sampling pays at
all. The MNIST MLP (784-500-500-10, batch 50) takes about 1 ms per 500-wide layer for the
exact forward and backward, and the general kernel (:mod:`approxcompile.ops.kernels`)
spends much of what sampling saves on what it does for large layers: it gathers the weight
columns twice instead of keeping a ``(p, k)`` copy (23 MB for a 4096 x 4096 weight at keep
0.35), builds gradients in workspace memory, tests ``dy`` for dead columns, and handles
autocast and tracing. None of that pays at this size (measured in docs/performance.md,
"Session 7"). This product keeps the gathered weight columns for ``dx``, takes plain
allocations for the full-size gradients (blocks of this size come back from the
allocator's free lists) and runs only the products autograd asks for.

The results are those of the general kernel: the same products on the same slices, and
the same scatter (``kernels._scatter``) of the kept columns into zeros.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from approxcompile.ops import amp
from approxcompile.ops.kernels import LIVE_MIN_MACS, _input_slice, _scatter

# Full-size gradients (p x n weight, rows x n input) up to this many elements (4 MB in
# fp32) take this product; larger ones the general kernel and its workspace.
SMALL_GRADIENT = 1 << 20


def small(x: Tensor, weight: Tensor, k: int) -> bool:
    """Whether a plain eager sampled linear of ``x`` and ``weight`` keeping ``k`` columns is small.

    Small: both full-size gradients fit ``SMALL_GRADIENT`` and the products are below the
    size at which the general kernel would test ``dy`` for dead columns (``LIVE_MIN_MACS``),
    so both compute the same sums.
    """
    p, n = weight.shape
    rows = x.numel() // n
    return p * n <= SMALL_GRADIENT and rows * n <= SMALL_GRADIENT and 2 * rows * p * k < LIVE_MIN_MACS


class _SmallLinear(torch.autograd.Function):
    """``y = (x[:, I] * s) @ W[:, I]^T + b``, keeping ``xs = x[:, I] * s`` and ``ws = W[:, I]``."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        index: Tensor,
        scale: Tensor | None,
        unique: bool,
    ) -> Tensor:
        p, n = weight.shape
        xs = _input_slice(x, index, scale, n, None)
        ws = weight.index_select(1, index)
        y = torch.addmm(bias, xs, ws.t()) if bias is not None else xs @ ws.t()
        ctx.save_for_backward(xs, ws, index, scale)
        ctx.x_shape, ctx.unique, ctx.has_bias = x.shape, unique, bias is not None
        return y.view(*x.shape[:-1], p)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        amp.refuse_double_backward("sampled_linear")
        xs, ws, index, scale = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        p, n = ws.shape[0], ctx.x_shape[-1]
        dy2 = dy.reshape(-1, p)
        dx = dw = db = None
        if need_x:
            dxs = dy2 @ ws
            if scale is not None:
                dxs.mul_(scale.to(dxs.dtype))
            dx = _scatter(dxs, 1, index, dxs.new_empty(dy2.shape[0], n), ctx.unique).view(ctx.x_shape)
        if need_w:
            dw = _scatter(dy2.t() @ xs, 1, index, xs.new_empty(p, n), ctx.unique)
        if need_b and ctx.has_bias:
            db = dy2.sum(0)
        return dx, dw, db, None, None, None


def small_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor, scale: Tensor | None, unique: bool
) -> Tensor:
    """The sampled linear product of a call that ``kernels.plain_call`` and :func:`small` accepted."""
    y: Tensor = _SmallLinear.apply(x, weight, bias, index, scale, unique)
    return y
