"""Backward sampling: an exact forward pass and sampled gradient products.

::

    linear(x, W, b) -> backward_sampled_linear(x, W, b, keep=0.4, row_keep=0.25, method='bernoulli', ...)
    conv2d(x, W, b, s, p, d) -> backward_sampled_conv(x, W, b, s, p, d, keep=0.4, method='bernoulli', ...)

The forward product ``Y = X·Wᵀ + b`` is exact. In backward, with ``dY`` of shape ``(M, p)``:

- the input gradient ``dX = dY·W`` sums over the ``p`` output features; it keeps ``keep`` of
  them, output feature ``o`` with score ``|W[o]|·|dY[:, o]|``;
- the weight gradient ``dW = dYᵀ·X`` sums over the ``M`` batch rows; it keeps ``row_keep``
  of them (default: ``keep``; the cost model chooses the two apart), row ``b``
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

Forward and backward are ``torch.library`` custom ops with registered autograd and fake
kernels (``torch.compile`` keeps them in one graph); both draw from torch's generator at
run time and are tagged ``nondeterministic_seeded``, so no compiler pass redraws them. A
caller's ``torch.Generator`` reaches them by number (``draw.generator_handle``, eager-only).
Drawing the rows in forward (``row_scores="x"``) gives a random row count with
``bernoulli``: compiling that needs ``torch._dynamo.config.capture_dynamic_output_shape_ops``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from approxcompile.choices import ROW_SCORES, UNBIASED_METHODS
from approxcompile.ops.amp import refuse_double_backward
from approxcompile.ops.draw import generator_handle, lookup
from approxcompile.ops.estimator import CONV, DEFAULT_EPS, scale_along
from approxcompile.ops.kernels import autocast_inputs, column_norms, conv_args, plain_conv, slice_norms
from approxcompile.ops.sampling import sample_pairs
from approxcompile.plan import kept_count


def _draw_rows(
    x2: Tensor, keep: float, method: str, eps: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Rows (dim 0) of ``x2`` drawn by ``|x2[b]|``, scaled: ``(rows, index)``."""
    index, scale = sample_pairs(
        slice_norms(x2, 0), kept_count(keep, x2.shape[0]), method, eps=eps, generator=generator
    )
    return scale_along(x2.index_select(0, index), scale, 0), index


def _rows_fake(x: Tensor, keep: float, method: str) -> tuple[Tensor, Tensor]:
    rows: int | torch.SymInt = torch.library.get_ctx().new_dynamic_size()
    if method != "bernoulli" and isinstance(x.shape[0], int):
        rows = kept_count(keep, x.shape[0])
    return x.new_empty((rows, *x.shape[1:])), x.new_empty((rows,), dtype=torch.long)


@torch.library.custom_op(
    "approxcompile::backward_sampled_linear_forward",
    mutates_args=(),
    tags=(torch.Tag.nondeterministic_seeded,),
)
def _linear_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    keep: float,
    row_keep: float,
    method: str,
    eps: float,
    draw_rows: bool,
    generator: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``y = x·Wᵀ + b`` exactly -> ``(y, rows, row_index)``; the row sample only with ``draw_rows``.

    The row sample is drawn now so that only the sampled rows outlive the forward.
    """
    p, n = weight.shape
    x2 = x.reshape(-1, n)
    y = F.linear(x2, weight, bias).view(*x.shape[:-1], p)
    if not draw_rows:
        return y, x.new_empty(0), x.new_empty(0, dtype=torch.long)
    rows, index = _draw_rows(x2, row_keep, method, eps, lookup(generator))
    return y, rows, index


@_linear_forward.register_fake
def _linear_forward_fake(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    keep: float,
    row_keep: float,
    method: str,
    eps: float,
    draw_rows: bool,
    generator: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    if not draw_rows:
        return y, x.new_empty(0), x.new_empty(0, dtype=torch.long)
    return (y, *_rows_fake(x.reshape(-1, weight.shape[1]), row_keep, method))


@torch.library.custom_op(
    "approxcompile::backward_sampled_linear_backward",
    mutates_args=(),
    tags=(torch.Tag.nondeterministic_seeded,),
)
def _linear_backward_op(
    dy: Tensor,
    saved_x: Tensor | None,
    weight: Tensor | None,
    row_index: Tensor,
    x_shape: Sequence[int],
    keep: float,
    row_keep: float,
    method: str,
    eps: float,
    rows_drawn: bool,
    generator: int | None,
) -> tuple[Tensor, Tensor]:
    """``(dx, dW)``: ``dx`` over ``keep`` of the outputs (needs ``weight``), ``dW`` over ``row_keep`` rows.

    A product whose ratio keeps everything is computed exactly.
    """
    gen = lookup(generator)
    p = dy.shape[-1]
    dy2 = dy.reshape(-1, p)
    dx = dw = dy.new_empty(0)
    if weight is not None and kept_count(keep, p) >= p:
        dx = (dy2 @ weight).view(x_shape)
    elif weight is not None:
        scores = slice_norms(weight, 0) * column_norms(dy2)
        index, scale = sample_pairs(scores, kept_count(keep, p), method, eps=eps, generator=gen)
        dys = dy2.index_select(1, index)
        if scale is not None:
            dys.mul_(scale.to(dys.dtype))
        dx = (dys @ weight.index_select(0, index)).view(x_shape)
    if saved_x is not None:
        rows = kept_count(row_keep, dy2.shape[0])
        if rows_drawn:
            dw = dy2.index_select(0, row_index).t() @ saved_x
        elif rows >= dy2.shape[0]:
            dw = dy2.t() @ saved_x
        else:
            scores = slice_norms(saved_x, 0) * slice_norms(dy2, 0)
            index, scale = sample_pairs(scores, rows, method, eps=eps, generator=gen)
            dw = scale_along(dy2.index_select(0, index), scale, 0).t() @ saved_x.index_select(0, index)
    return dx, dw


@_linear_backward_op.register_fake
def _linear_backward_fake(
    dy: Tensor,
    saved_x: Tensor | None,
    weight: Tensor | None,
    row_index: Tensor,
    x_shape: Sequence[int],
    keep: float,
    row_keep: float,
    method: str,
    eps: float,
    rows_drawn: bool,
    generator: int | None,
) -> tuple[Tensor, Tensor]:
    dx = dy.new_empty(x_shape) if weight is not None else dy.new_empty(0)
    dw = dy.new_empty((dy.shape[-1], saved_x.shape[-1])) if saved_x is not None else dy.new_empty(0)
    return dx, dw


def _linear_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    x, weight, bias, keep, row_keep, method, eps, draw_rows, generator = inputs
    _, rows, row_index = output
    ctx.mark_non_differentiable(rows, row_index)
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    saved_x = (rows if draw_rows else x.reshape(-1, weight.shape[1])) if need_w else None
    ctx.save_for_backward(saved_x, weight if need_x else None, row_index)
    ctx.sample = (x.shape, keep, row_keep, method, eps, draw_rows, generator)
    ctx.has_bias = bias is not None


def _linear_backward(ctx: Any, dy: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
    refuse_double_backward("backward_sampled_linear")
    saved_x, weight, row_index = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = torch.ops.approxcompile.backward_sampled_linear_backward(
        dy, saved_x, weight, row_index, *ctx.sample
    )
    db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx if need_x else None, dw if need_w else None, db, None, None, None, None, None, None


_linear_forward.register_autograd(_linear_backward, setup_context=_linear_setup)


def _conv_grads(
    dy: Tensor, x: Tensor, weight: Tensor, conv: tuple[Sequence[int], ...], mask: tuple[bool, bool]
) -> tuple[Tensor, Tensor]:
    out = torch.ops.aten.convolution_backward(dy, x, weight, None, *conv_args(*conv), (*mask, False))
    return out[0], out[1]


@torch.library.custom_op(
    "approxcompile::backward_sampled_conv_forward", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,)
)
def _conv_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    keep: float,
    row_keep: float,
    method: str,
    eps: float,
    draw_rows: bool,
    generator: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact convolution -> ``(y, samples, sample_index)``; samples drawn by ``|X[b]|_F`` if ``draw_rows``."""
    y = plain_conv(x, weight, bias, stride, padding, dilation)
    if not draw_rows:
        return y, x.new_empty(0), x.new_empty(0, dtype=torch.long)
    rows, index = _draw_rows(x, row_keep, method, eps, lookup(generator))
    return y, rows, index


@_conv_forward.register_fake
def _conv_forward_fake(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    keep: float,
    row_keep: float,
    method: str,
    eps: float,
    draw_rows: bool,
    generator: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    y = plain_conv(x, weight, bias, stride, padding, dilation)
    if not draw_rows:
        return y, x.new_empty(0), x.new_empty(0, dtype=torch.long)
    return (y, *_rows_fake(x, row_keep, method))


@torch.library.custom_op(
    "approxcompile::backward_sampled_conv_backward",
    mutates_args=(),
    tags=(torch.Tag.nondeterministic_seeded,),
)
def _conv_backward_op(
    dy: Tensor,
    saved_x: Tensor | None,
    weight: Tensor | None,
    row_index: Tensor,
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    keep: float,
    row_keep: float,
    method: str,
    eps: float,
    rows_drawn: bool,
    generator: int | None,
) -> tuple[Tensor, Tensor]:
    """``(dx, dW)``: channel ``o`` scores ``|W[o]|_F·|dY[:, o]|_F``, sample ``b`` ``|X[b]|_F·|dY[b]|_F``."""
    gen = lookup(generator)
    conv = (stride, padding, dilation)
    dx = dw = dy.new_empty(0)
    if weight is not None and kept_count(keep, weight.shape[0]) >= weight.shape[0]:
        dx = _conv_grads(dy, dy.new_empty(1).expand(x_shape), weight, conv, (True, False))[0]
    elif weight is not None:
        o = weight.shape[0]
        scores = slice_norms(weight, 0) * slice_norms(dy, 1)
        index, scale = sample_pairs(scores, kept_count(keep, o), method, eps=eps, generator=gen)
        stub = dy.new_empty(1).expand(x_shape)  # grad_input needs only the shape
        dys = scale_along(dy.index_select(1, index), scale, 1)
        dx = _conv_grads(dys, stub, weight.index_select(0, index), conv, (True, False))[0]
    if saved_x is not None:
        if rows_drawn:
            xs, dys = saved_x, dy.index_select(0, row_index)
        elif kept_count(row_keep, dy.shape[0]) >= dy.shape[0]:
            xs, dys = saved_x, dy
        else:
            rows = kept_count(row_keep, dy.shape[0])
            scores = slice_norms(saved_x, 0) * slice_norms(dy, 0)
            index, scale = sample_pairs(scores, rows, method, eps=eps, generator=gen)
            xs, dys = saved_x.index_select(0, index), scale_along(dy.index_select(0, index), scale, 0)
        w_stub = dy.new_empty(1).expand(w_shape)
        dw = _conv_grads(dys, xs, w_stub, conv, (False, True))[1]
    return dx, dw


@_conv_backward_op.register_fake
def _conv_backward_fake(
    dy: Tensor,
    saved_x: Tensor | None,
    weight: Tensor | None,
    row_index: Tensor,
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    keep: float,
    row_keep: float,
    method: str,
    eps: float,
    rows_drawn: bool,
    generator: int | None,
) -> tuple[Tensor, Tensor]:
    dx = dy.new_empty(x_shape) if weight is not None else dy.new_empty(0)
    return dx, dy.new_empty(w_shape) if saved_x is not None else dy.new_empty(0)


def _conv_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    x, weight, bias, stride, padding, dilation, keep, row_keep, method, eps, draw_rows, generator = inputs
    _, rows, row_index = output
    ctx.mark_non_differentiable(rows, row_index)
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    saved_x = (rows if draw_rows else x) if need_w else None
    ctx.save_for_backward(saved_x, weight if need_x else None, row_index)
    ctx.sample = (
        x.shape,
        weight.shape,
        stride,
        padding,
        dilation,
        keep,
        row_keep,
        method,
        eps,
        draw_rows,
        generator,
    )
    ctx.has_bias = bias is not None


def _conv_backward(ctx: Any, dy: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
    refuse_double_backward("backward_sampled_conv")
    saved_x, weight, row_index = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = torch.ops.approxcompile.backward_sampled_conv_backward(
        dy, saved_x, weight, row_index, *ctx.sample
    )
    db = None
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = dy.sum([d for d in range(dy.dim()) if d != 1])
    return (dx if need_x else None, dw if need_w else None, db, *([None] * 9))


_conv_forward.register_autograd(_conv_backward, setup_context=_conv_setup)


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
    row_keep: float | None = None,
    method: str = "bernoulli",
    training: bool = True,
    eps: float = DEFAULT_EPS,
    row_scores: str = "x_dy",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``F.linear(x, weight, bias)`` exactly, with unbiased sampled input and weight gradients.

    >>> y = backward_sampled_linear(x, w, b, keep=0.25)  # dX over ~p/4 features, dW over ~M/4 rows
    >>> y = backward_sampled_linear(x, w, b, keep=0.5, row_keep=0.2)  # dX over ~p/2, dW over ~M/5

    ``row_keep`` (default: ``keep``) is dW's ratio; a ratio that keeps everything makes
    that product exact.
    """
    check_backward_method(method)
    if row_scores not in ROW_SCORES:
        raise ValueError(f"row_scores must be one of {ROW_SCORES}, got {row_scores!r}")
    row_keep = keep if row_keep is None else row_keep
    rows = x.numel() // max(weight.shape[-1], 1)
    exact = rows == 0 or (
        kept_count(keep, weight.shape[0]) >= weight.shape[0] and kept_count(row_keep, rows) >= rows
    )
    # An exporter traces through the op's forward only, and ONNX Runtime then builds
    # the exact gradient of that forward: sampling here would change nothing exported.
    if not training or exact or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return F.linear(x, weight, bias)
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return F.linear(x, weight, bias)  # nothing will be differentiated: nothing to sample
    x, weight, bias = autocast_inputs(x, weight, bias)
    draw_rows = row_scores == "x" and weight.requires_grad and kept_count(row_keep, rows) < rows
    args = (keep, row_keep, method, eps, draw_rows, generator_handle(generator))
    return _linear_forward(x, weight, bias, *args)[0]


def backward_sampled_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    *,
    keep: float,
    row_keep: float | None = None,
    method: str = "bernoulli",
    training: bool = True,
    eps: float = DEFAULT_EPS,
    row_scores: str = "x_dy",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``F.conv{1,2,3}d(x, weight, bias, stride, padding, dilation)`` exactly; unbiased sampled gradients.

    ``dX`` sums over ~``keep`` of the output channels, ``dW`` over ~``row_keep`` (default
    ``keep``) of the batch samples.
    Only ``groups=1`` convolutions of batched inputs with integer padding are sampled.
    """
    check_backward_method(method)
    if row_scores not in ROW_SCORES:
        raise ValueError(f"row_scores must be one of {ROW_SCORES}, got {row_scores!r}")
    d = weight.dim() - 2
    conv = CONV[d]
    row_keep = keep if row_keep is None else row_keep
    o, batch = weight.shape[0], x.shape[0]
    exact = x.numel() == 0 or (kept_count(keep, o) >= o and kept_count(row_keep, batch) >= batch)
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
    x, weight, bias = autocast_inputs(x, weight, bias)
    conv_args = tuple(list(_ntuple(d)(a)) for a in (stride, padding, dilation))
    draw_rows = row_scores == "x" and weight.requires_grad and kept_count(row_keep, batch) < batch
    return _conv_forward(
        x, weight, bias, *conv_args, keep, row_keep, method, eps, draw_rows, generator_handle(generator)
    )[0]


def _ntuple(d: int) -> Callable[[int | Sequence[int]], tuple[int, ...]]:
    return lambda a: tuple(a) if isinstance(a, Sequence) else (a,) * d
