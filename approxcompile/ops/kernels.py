"""Fast building blocks of the sampled ops: score norms and the sampled linear product.

Where the time goes on a CPU (design.md): reducing a weight over its rows with
``W.norm(dim=0)`` is a strided reduction that costs more than a dense GEMM's tenth, and
plain autograd through ``index_select`` saves the full input, allocates full-size
zero-filled gradients for every operand and computes gradients nobody asked for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_ROW_BLOCK = 256  # rows per chunk: a 256 x 4096 fp32 block (4 MB) stays in cache


def column_norms(t: Tensor) -> Tensor:
    """``|t[:, j]|`` for a 2-D ``t``, reading rows in cache-sized chunks.

    Squares each chunk and sums it down its rows (a contiguous, vectorised reduction)
    instead of a strided reduction over the whole matrix, and never materialises a
    full-size temporary.
    """
    t = t.detach()
    if t.shape[0] <= _ROW_BLOCK:
        return t.float().square().sum(0).sqrt_()
    acc = torch.zeros(t.shape[1], dtype=torch.float32, device=t.device)
    for block in t.split(_ROW_BLOCK):
        acc.add_(block.float().square().sum(0))
    return acc.sqrt_()


class SampledLinearFn(torch.autograd.Function):
    """``y = (x[:, I] * s) @ W[:, I]^T + b`` with a backward that touches only the sample.

    Saves the gathered ``(M, k)`` input instead of the full one, computes only the
    gradients autograd asks for, and scatters the ``k`` gradient columns into a zero
    gradient (``index_add_`` when ``I`` repeats an index, as ``crs`` can).
    """

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
        n, p = weight.shape[1], weight.shape[0]
        x2 = x.reshape(-1, n)
        xs = x2.index_select(1, index)
        if scale is not None:
            xs.mul_(scale.to(xs.dtype))
        ws = weight.index_select(1, index)
        y = torch.addmm(bias, xs, ws.t()) if bias is not None else xs @ ws.t()
        ctx.save_for_backward(xs, ws, index, scale)
        ctx.shapes = (x.shape, n, p)
        ctx.unique = unique
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], p)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        xs, ws, index, scale = ctx.saved_tensors
        x_shape, n, p = ctx.shapes
        dy2 = dy.reshape(-1, p)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dxs = dy2 @ ws
            if scale is not None:
                dxs.mul_(scale.to(dxs.dtype))
            dx = _scatter_columns(dxs, index, n, ctx.unique).view(x_shape)
        if ctx.needs_input_grad[1]:
            dw = _scatter_columns(dy2.t() @ xs, index, n, ctx.unique)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db, None, None, None


def _scatter_columns(cols: Tensor, index: Tensor, n: int, unique: bool) -> Tensor:
    out = cols.new_zeros(cols.shape[0], n)
    return out.index_copy_(1, index, cols) if unique else out.index_add_(1, index, cols)
