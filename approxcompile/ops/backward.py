"""Backward sampling: an exact forward pass and sampled gradient products.

::

    linear(x, W, b) -> backward_sampled_linear(x, W, b, keep=0.4, method='bernoulli', training=training)
    conv2d(x, W, b, s, p, d) -> backward_sampled_conv(x, W, b, s, p, d, keep=0.4, method='bernoulli', ...)

The forward product ``Y = X·Wᵀ + b`` is exact. In backward, with ``dY`` of shape ``(M, p)``:

- the input gradient ``dX = dY·W`` sums over the ``p`` output features; it keeps output
  feature ``o`` with score ``|W[o]|·|dY[:, o]|``;
- the weight gradient ``dW = dYᵀ·X`` sums over the ``M`` batch rows; it keeps row ``b``
  with score ``|X[b]|·|dY[b]|`` (``row_scores="x_dy"``, the default) or ``|X[b]|``
  (``row_scores="x"``);
- the bias gradient ``db = dY.sum(0)`` stays exact (it costs ``M·p``, no product).

The two samples are drawn independently with an unbiased method (``bernoulli``, ``crs``
or ``uniform``; biased ``topk`` is refused), so ``E[dX̂] = dX`` and ``E[dŴ] = dW``.

Memory: a row score needs ``dY``, which exists only in backward, so with ``"x_dy"`` the whole
``X`` must be saved (as an exact linear saves it). With ``"x"`` the rows are drawn in the
forward pass and only the ``≈ keep·M`` sampled rows, already scaled, are saved: the
activation memory of the layer drops by ``1 - keep`` (docs/distributed.md has the figures).
Only the gradients autograd asks for (``ctx.needs_input_grad``) are computed.

Convolutions follow the same plan with output channels for ``p`` and batch samples for
the rows (Frobenius norms of the slices as scores), through ``aten.convolution_backward``
on the gathered slices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from approxcompile.choices import ROW_SCORES, UNBIASED_METHODS
from approxcompile.ops.estimator import CONV, DEFAULT_EPS, scale_along
from approxcompile.ops.kernels import column_norms, slice_norms
from approxcompile.ops.sampling import sample_pairs
from approxcompile.plan import kept_count


class BackwardSampledLinearFn(torch.autograd.Function):
    """``y = x·Wᵀ + b`` exactly; ``dx`` over sampled output features, ``dW`` over sampled rows."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        keep: float,
        method: str,
        eps: float,
        row_scores: str,
        generator: torch.Generator | None,
    ) -> Tensor:
        p, n = weight.shape
        x2 = x.reshape(-1, n)
        y = F.linear(x2, weight, bias)
        ctx.sample = (keep, method, eps, generator)
        ctx.shapes = (x.shape, n, p)
        ctx.has_bias = bias is not None
        ctx.rows_drawn = row_scores == "x"
        needs_x, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        saved_x: Tensor | None = None
        if needs_w and ctx.rows_drawn:
            # The row sample is drawn now so that only the sampled rows outlive the forward.
            index, scale = sample_pairs(
                slice_norms(x2, 0), kept_count(keep, x2.shape[0]), method, eps=eps, generator=generator
            )
            saved_x = scale_along(x2.index_select(0, index), scale, 0).detach()
            ctx.row_index = index
        elif needs_w:
            saved_x = x2.detach()
        ctx.save_for_backward(saved_x, weight if needs_x else None)
        return y.view(*x.shape[:-1], p)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        saved_x, weight = ctx.saved_tensors
        x_shape, n, p = ctx.shapes
        keep, method, eps, generator = ctx.sample
        dy2 = dy.reshape(-1, p)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            scores = slice_norms(weight, 0) * column_norms(dy2)
            index, scale = sample_pairs(scores, kept_count(keep, p), method, eps=eps, generator=generator)
            dys = dy2.index_select(1, index)
            if scale is not None:
                dys.mul_(scale.to(dys.dtype))
            dx = (dys @ weight.index_select(0, index)).view(x_shape)
        if ctx.needs_input_grad[1]:
            if ctx.rows_drawn:
                dw = dy2.index_select(0, ctx.row_index).t() @ saved_x
            else:
                scores = slice_norms(saved_x, 0) * slice_norms(dy2, 0)
                rows = kept_count(keep, dy2.shape[0])
                index, scale = sample_pairs(scores, rows, method, eps=eps, generator=generator)
                dw = scale_along(dy2.index_select(0, index), scale, 0).t() @ saved_x.index_select(0, index)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db, None, None, None, None, None


def _conv_grads(
    dy: Tensor, x: Tensor, weight: Tensor, conv: tuple[list[int], ...], mask: tuple[bool, bool]
) -> tuple[Tensor, Tensor]:
    stride, padding, dilation = conv
    out = torch.ops.aten.convolution_backward(
        dy, x, weight, None, stride, padding, dilation, False, [0] * len(stride), 1, (*mask, False)
    )
    return out[0], out[1]


class BackwardSampledConvFn(torch.autograd.Function):
    """Convolution, exact; ``dx`` over sampled output channels, ``dW`` over sampled batch samples.

    Channel ``o`` scores ``|W[o]|_F·|dY[:, o]|_F``, sample ``b`` scores ``|X[b]|_F·|dY[b]|_F``
    (``|X[b]|_F`` with ``row_scores="x"``, drawn in forward: only those samples are saved).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        conv: tuple[list[int], ...],
        keep: float,
        method: str,
        eps: float,
        row_scores: str,
        generator: torch.Generator | None,
    ) -> Tensor:
        stride, padding, dilation = conv
        y = torch.ops.aten.convolution(
            x, weight, bias, stride, padding, dilation, False, [0] * len(stride), 1
        )
        ctx.sample = (keep, method, eps, generator)
        ctx.conv, ctx.x_shape, ctx.weight_shape = conv, x.shape, weight.shape
        ctx.has_bias = bias is not None
        ctx.rows_drawn = row_scores == "x"
        needs_x, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        saved_x: Tensor | None = None
        if needs_w and ctx.rows_drawn:
            index, scale = sample_pairs(
                slice_norms(x, 0), kept_count(keep, x.shape[0]), method, eps=eps, generator=generator
            )
            saved_x = scale_along(x.index_select(0, index), scale, 0).detach()
            ctx.row_index = index
        elif needs_w:
            saved_x = x.detach()
        ctx.save_for_backward(saved_x, weight if needs_x else None)
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        saved_x, weight = ctx.saved_tensors
        keep, method, eps, generator = ctx.sample
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            o = weight.shape[0]
            scores = slice_norms(weight, 0) * slice_norms(dy, 1)
            index, scale = sample_pairs(scores, kept_count(keep, o), method, eps=eps, generator=generator)
            stub = dy.new_empty(1).expand(ctx.x_shape)  # grad_input needs only the shape
            dys = scale_along(dy.index_select(1, index), scale, 1)
            dx = _conv_grads(dys, stub, weight.index_select(0, index), ctx.conv, (True, False))[0]
        if ctx.needs_input_grad[1]:
            if ctx.rows_drawn:
                xs, dys = saved_x, dy.index_select(0, ctx.row_index)
            else:
                scores = slice_norms(saved_x, 0) * slice_norms(dy, 0)
                n = kept_count(keep, dy.shape[0])
                index, scale = sample_pairs(scores, n, method, eps=eps, generator=generator)
                xs, dys = saved_x.index_select(0, index), scale_along(dy.index_select(0, index), scale, 0)
            w_stub = dy.new_empty(1).expand(ctx.weight_shape)
            dw = _conv_grads(dys, xs, w_stub, ctx.conv, (False, True))[1]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum([d for d in range(dy.dim()) if d != 1])
        return dx, dw, db, None, None, None, None, None, None


def check_backward_method(method: str) -> str:
    if method not in UNBIASED_METHODS:
        raise ValueError(
            f"backward sampling needs an unbiased method {UNBIASED_METHODS}, got {method!r}: a biased "
            "gradient (topk) drifts the training; pass method='bernoulli'"
        )
    return method


def backward_sampled_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    keep: float,
    method: str = "bernoulli",
    training: bool = True,
    eps: float = DEFAULT_EPS,
    row_scores: str = "x_dy",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``F.linear(x, weight, bias)`` exactly, with unbiased sampled input and weight gradients.

    >>> y = backward_sampled_linear(x, w, b, keep=0.25)  # dX over ~p/4 features, dW over ~M/4 rows
    """
    check_backward_method(method)
    if row_scores not in ROW_SCORES:
        raise ValueError(f"row_scores must be one of {ROW_SCORES}, got {row_scores!r}")
    rows = x.numel() // max(weight.shape[-1], 1)
    exact = kept_count(keep, weight.shape[0]) >= weight.shape[0] and kept_count(keep, rows) >= rows
    # An exporter traces through the Function's forward only, and ONNX Runtime then builds
    # the exact gradient of that forward: sampling here would change nothing exported.
    if not training or exact or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return F.linear(x, weight, bias)
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return F.linear(x, weight, bias)  # nothing will be differentiated: nothing to sample
    return BackwardSampledLinearFn.apply(x, weight, bias, keep, method, eps, row_scores, generator)


def backward_sampled_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    *,
    keep: float,
    method: str = "bernoulli",
    training: bool = True,
    eps: float = DEFAULT_EPS,
    row_scores: str = "x_dy",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``F.conv{1,2,3}d(x, weight, bias, stride, padding, dilation)`` exactly; unbiased sampled gradients.

    ``dX`` sums over ~``keep`` of the output channels, ``dW`` over ~``keep`` of the batch samples.
    Only ``groups=1`` convolutions of batched inputs with integer padding are sampled.
    """
    check_backward_method(method)
    if row_scores not in ROW_SCORES:
        raise ValueError(f"row_scores must be one of {ROW_SCORES}, got {row_scores!r}")
    d = weight.dim() - 2
    conv = CONV[d]
    o, batch = weight.shape[0], x.shape[0]
    exact = kept_count(keep, o) >= o and kept_count(keep, batch) >= batch
    if (
        not training
        or exact
        or x.dim() != weight.dim()
        or isinstance(padding, str)
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or not torch.is_grad_enabled()
        or not any(t is not None and t.requires_grad for t in (x, weight, bias))
    ):
        return conv(x, weight, bias, stride, padding, dilation)
    args = tuple(list(_ntuple(d)(a)) for a in (stride, padding, dilation))
    return BackwardSampledConvFn.apply(x, weight, bias, args, keep, method, eps, row_scores, generator)


def _ntuple(d: int) -> Callable[[int | Sequence[int]], tuple[int, ...]]:
    return lambda a: tuple(a) if isinstance(a, Sequence) else (a,) * d
