"""Fast building blocks of the sampled ops: score norms and the sampled linear / conv products.

Where the time goes on a CPU (measured in docs/performance.md):

- reducing a weight over its rows with ``W.norm(dim=0)`` is a strided reduction that
  costs more than a dense GEMM's tenth; :func:`column_norms` reads rows in cache-sized
  chunks instead;
- plain autograd through ``index_select`` saves the full input, allocates full-size
  zero-filled gradients on fresh pages every step and computes gradients nobody asked
  for. The autograd functions here save only the sampled slices, compute only what
  ``ctx.needs_input_grad`` asks for, and build the full-size gradients in
  :data:`~approxcompile.ops.workspace.WORKSPACE` memory that is reused across steps.

Both functions compute exactly what autograd through ``index_select`` computes (the
tests compare them), for every method: sorted indices, a per-index scale or none, and
repeated indices (``crs``) accumulated.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from approxcompile.ops.workspace import WORKSPACE

_ACC_ROWS = 256  # rows per accumulator block: 256 x 4096 fp32 is 4 MB, read once per chunk


def column_norms(t: Tensor) -> Tensor:
    """``|t[:, j]|`` for a 2-D ``t``, reading rows in cache-sized chunks.

    Accumulates ``block * block`` of successive row blocks into one block-sized
    accumulator (``addcmul_``: contiguous, vectorised, no temporaries) and reduces it
    once, instead of a strided reduction over the whole matrix.
    """
    t = t.detach()
    if t.dtype != torch.float32 and t.dtype != torch.float64:
        t = t.float()
    rows = t.shape[0]
    if rows <= 2 * _ACC_ROWS:
        return t.square().sum(0).sqrt_()
    full = rows - rows % _ACC_ROWS
    blocks = t[:full].split(_ACC_ROWS)
    acc = blocks[0].square()
    for block in blocks[1:]:
        acc.addcmul_(block, block)
    out = acc.sum(0)
    if full < rows:
        out.add_(t[full:].square().sum(0))
    return out.sqrt_()


def slice_norms(t: Tensor, dim: int) -> Tensor:
    """Euclidean norm of every slice of ``t`` along ``dim`` (reduces all other dims)."""
    if dim % t.dim() == t.dim() - 1:  # the inner dim is contiguous: reduce row chunks
        return column_norms(t.reshape(-1, t.shape[-1]))
    t = t.detach().float()
    if dim % t.dim() == 1 and t.is_contiguous():
        # Channels: reduce each contiguous (H*W...) run first, then the batch, which is
        # ~10x faster than one reduction over dims (0, 2, 3) on a CPU.
        per_sample = torch.linalg.vector_norm(t.reshape(t.shape[0], t.shape[1], -1), dim=2)
        return torch.linalg.vector_norm(per_sample, dim=0)
    dims = tuple(d for d in range(t.dim()) if d != dim % t.dim())
    return torch.linalg.vector_norm(t, dim=dims)


def _scatter(cols: Tensor, dim: int, index: Tensor, full: Tensor, unique: bool) -> Tensor:
    """``full`` (zeroed here) with ``cols`` placed at ``index`` along ``dim``; repeats add up."""
    full.zero_()
    # index_add_ is also the faster kernel for unique indices on CPU (measured); index_copy_
    # is kept for devices where add needs atomics.
    if unique and full.device.type != "cpu":
        return full.index_copy_(dim, index, cols)
    return full.index_add_(dim, index, cols)


class SampledLinearFn(torch.autograd.Function):
    """``y = (x[:, I] * s) @ W[:, I]^T + b`` with a backward that touches only the sample.

    Saves the gathered ``(M, k)`` input and ``(p, k)`` weight columns, computes only the
    gradients autograd asks for, and scatters the ``k`` gradient columns into full-size
    gradients held in reusable workspace memory.
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
        ws = WORKSPACE.get(weight, "ws", (p, index.numel()), weight.dtype)
        torch.index_select(weight, 1, index, out=ws)
        y = torch.addmm(bias, xs, ws.t()) if bias is not None else xs @ ws.t()
        ctx.save_for_backward(xs, ws, index, scale)
        ctx.x_shape = x.shape
        ctx.unique = unique
        ctx.has_bias = bias is not None
        ctx.weight = weight  # workspace key only; never read in backward
        return y.view(*x.shape[:-1], p)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        xs, ws, index, scale = ctx.saved_tensors
        p, n = ws.shape[0], ctx.weight.shape[1]
        dy2 = dy.reshape(-1, p)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dxs = dy2 @ ws
            if scale is not None:
                dxs.mul_(scale.to(dxs.dtype))
            full = WORKSPACE.get(ctx.weight, "dx", (dy2.shape[0], n), dxs.dtype)
            dx = _scatter(dxs, 1, index, full, ctx.unique).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dws = WORKSPACE.get(ctx.weight, "dws", (p, index.numel()), xs.dtype)
            torch.mm(dy2.t(), xs, out=dws)
            full = WORKSPACE.get(ctx.weight, "grad", (p, n), dws.dtype)
            dw = _scatter(dws, 1, index, full, ctx.unique)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db, None, None, None


class SampledConvFn(torch.autograd.Function):
    """``conv(x[:, I], W[:, I] * s, b)`` over a sample ``I`` of input channels (groups = 1).

    The scale rides on the (small) weight slice. Backward calls
    ``aten.convolution_backward`` with an output mask from ``ctx.needs_input_grad`` and
    scatters the channel gradients into reusable workspace memory.
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
        stride: list[int],
        padding: list[int],
        dilation: list[int],
    ) -> Tensor:
        xs = x.index_select(1, index)
        ws = weight.index_select(1, index)
        if scale is not None:
            ws.mul_(scale.to(ws.dtype).view(1, -1, *([1] * (ws.dim() - 2))))
        conv = (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3]
        y = conv(xs, ws, bias, stride, padding, dilation)
        ctx.save_for_backward(xs, ws, index, scale)
        ctx.conv = (stride, padding, dilation)
        ctx.x_shape = x.shape
        ctx.unique = unique
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.weight = weight  # workspace key and shape only
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        xs, ws, index, scale = ctx.saved_tensors
        stride, padding, dilation = ctx.conv
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.bias_sizes is not None and ctx.needs_input_grad[2]
        dxs, dws, db = torch.ops.aten.convolution_backward(
            dy.contiguous(memory_format=_memory_format(xs)),
            xs,
            ws,
            ctx.bias_sizes,
            stride,
            padding,
            dilation,
            False,
            [0] * len(stride),
            1,
            [need_x, need_w, need_b],
        )
        dx = dw = None
        if need_x:
            full = WORKSPACE.get(ctx.weight, "dx", ctx.x_shape, dxs.dtype)
            dx = _scatter(dxs, 1, index, full, ctx.unique)
        if need_w:
            if scale is not None:
                dws.mul_(scale.to(dws.dtype).view(1, -1, *([1] * (dws.dim() - 2))))
            full = WORKSPACE.get(ctx.weight, "grad", ctx.weight.shape, dws.dtype)
            dw = _scatter(dws, 1, index, full, ctx.unique)
        return dx, dw, db if need_b else None, None, None, None, None, None, None


def _memory_format(t: Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
