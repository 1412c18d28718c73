"""FLOP formulas of the custom ops, so ``FlopCounterMode`` counts the products inside them.

``FlopCounterMode`` sees a custom op as one call and not the ``mm`` / ``convolution`` its
kernel runs, so each op registers what its kernel computes, in the counter's own 2·M·N·K
convention. The backward-sampled ops draw their sample inside the kernel: the formulas
count ``kept_count(keep, n)`` slices, the exact count for ``topk``/``crs``/``uniform`` and
the expected one for ``bernoulli``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

from approxcompile.ops import attention, backward, kernels  # noqa: F401  (the ops must exist first)
from approxcompile.plan import kept_count

ops = torch.ops.approxcompile


@register_flop_formula(ops.sampled_linear_product, get_raw=True)
def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor, *args: Any, **kwargs: Any) -> int:
    p, n = weight.shape
    return 2 * (x.numel() // n) * index.numel() * p


@register_flop_formula(ops.sampled_linear_product_backward, get_raw=True)
def _linear_backward(dy: Tensor, xs: Tensor, weight: Tensor, *args: Any, **kwargs: Any) -> int:
    index, need_x, need_w = args[0], args[5], args[6]  # need_*: after scale, x_shape, n, unique
    rows = xs.numel() // xs.shape[-1]
    return 2 * rows * index.numel() * weight.shape[0] * (int(need_x) + int(need_w))


@register_flop_formula(ops.sampled_conv_product, get_raw=True)
def _conv(*args: Any, out_val: tuple[Tensor, Tensor, Tensor], **kwargs: Any) -> int:
    y, xs, ws = out_val
    return conv_flop_count(list(xs.shape), list(ws.shape), list(y.shape))


@register_flop_formula(ops.sampled_conv_product_backward, get_raw=True)
def _conv_backward(dy: Tensor, xs: Tensor, ws: Tensor, *args: Any, **kwargs: Any) -> int:
    index, need_x, need_w = args[0], args[8], args[9]  # need_*: after scale, shapes, unique, conv
    shape = [xs.shape[0], index.numel(), *xs.shape[2:]]
    return conv_flop_count(shape, list(ws.shape), list(dy.shape)) * (int(need_x) + int(need_w))


@register_flop_formula(ops.backward_sampled_linear_forward, get_raw=True)
def _exact_linear(x: Tensor, weight: Tensor, *args: Any, **kwargs: Any) -> int:
    p, n = weight.shape
    return 2 * (x.numel() // n) * n * p


@register_flop_formula(ops.backward_sampled_linear_backward, get_raw=True)
def _sampled_linear_grads(
    dy: Tensor,
    saved_x: Tensor | None,
    weight: Tensor | None,
    row_index: Tensor,
    x_shape: list[int],
    keep: float,
    row_keep: float,
    method: str,
    eps: float,
    rows_drawn: bool,
    *args: Any,
    **kwargs: Any,
) -> int:
    p, n = dy.shape[-1], x_shape[-1]
    m = math.prod(x_shape) // n
    flops = 2 * m * kept_count(keep, p) * n if weight is not None else 0
    if saved_x is not None:
        rows = row_index.numel() if rows_drawn else kept_count(row_keep, m)
        flops += 2 * rows * n * p
    return flops


@register_flop_formula(ops.backward_sampled_conv_forward, get_raw=True)
def _exact_conv(x: Tensor, weight: Tensor, *args: Any, out_val: tuple[Tensor, ...], **kwargs: Any) -> int:
    return conv_flop_count(list(x.shape), list(weight.shape), list(out_val[0].shape))


@register_flop_formula(ops.backward_sampled_conv_backward, get_raw=True)
def _sampled_conv_grads(
    dy: Tensor,
    saved_x: Tensor | None,
    weight: Tensor | None,
    row_index: Tensor,
    x_shape: list[int],
    w_shape: list[int],
    stride: Any,
    padding: Any,
    dilation: Any,
    keep: float,
    row_keep: float,
    method: str,
    eps: float,
    rows_drawn: bool,
    *args: Any,
    **kwargs: Any,
) -> int:
    full = conv_flop_count(list(x_shape), list(w_shape), list(dy.shape))  # 2·N·|W|·|out spatial|
    o, batch = w_shape[0], x_shape[0]
    flops = full * kept_count(keep, o) // o if weight is not None else 0
    if saved_x is not None:
        rows = row_index.numel() if rows_drawn else kept_count(row_keep, batch)
        flops += full * rows // batch
    return flops


@register_flop_formula(ops.backward_sampled_bmm, get_raw=True)
def _exact_bmm(a: Tensor, b: Tensor, *args: Any, **kwargs: Any) -> int:
    return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


@register_flop_formula(ops.backward_sampled_bmm_grads, get_raw=True)
def _sampled_bmm_grads(
    dy: Tensor, a: Tensor | None, b: Tensor | None, keep: float, *args: Any, **kwargs: Any
) -> int:
    g, m, p = dy.shape
    flops = 2 * g * m * b.shape[1] * kept_count(keep, p) if b is not None else 0
    if a is not None:
        flops += 2 * g * kept_count(keep, m) * a.shape[2] * p
    return flops
