"""Backward sampling: an exact forward pass and sampled gradient products.

::

    linear(x, W, b) -> backward_sampled_linear(x, W, b, keep=0.4, method='bernoulli', training=training)

The forward product ``Y = X·Wᵀ + b`` is exact. In backward, with ``dY`` of shape ``(M, p)``:

- the input gradient ``dX = dY·W`` sums over the ``p`` output features; it keeps output
  feature ``o`` with score ``|W[o]|·|dY[:, o]|``;
- the weight gradient ``dW = dYᵀ·X`` sums over the ``M`` batch rows; it keeps row ``b``
  with score ``|X[b]|·|dY[b]|`` (``row_scores="x_dy"``, design.md) or ``|X[b]|``
  (``row_scores="x"``);
- the bias gradient ``db = dY.sum(0)`` stays exact (it costs ``M·p``, no product).

The two samples are drawn independently with an unbiased method (``bernoulli``, ``crs``
or ``uniform``; biased ``topk`` is refused), so ``E[dX̂] = dX`` and ``E[dŴ] = dW``.

Memory: a row score needs ``dY``, which exists only in backward, so with ``"x_dy"`` the whole
``X`` must be saved (as an exact linear saves it). With ``"x"`` the rows are drawn in the
forward pass and only the ``≈ keep·M`` sampled rows, already scaled, are saved: the
activation memory of the layer drops by ``1 - keep`` (docs/distributed.md has the figures).
Only the gradients autograd asks for (``ctx.needs_input_grad``) are computed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from approxcompile.ops.kernels import column_norms
from approxcompile.ops.sampling import DEFAULT_EPS, sample_pairs
from approxcompile.plan import kept_count

UNBIASED_METHODS = ("bernoulli", "crs", "uniform")
ROW_SCORES = ("x_dy", "x")


def _row_norms(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t.detach().float(), dim=1)


def _scale_rows(t: Tensor, scale: Tensor | None) -> Tensor:
    return t if scale is None else t * scale.to(t.dtype).unsqueeze(1)


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
                _row_norms(x2), kept_count(keep, x2.shape[0]), method, eps=eps, generator=generator
            )
            saved_x = _scale_rows(x2.index_select(0, index), scale).detach()
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
            scores = _row_norms(weight) * column_norms(dy2)
            index, scale = sample_pairs(scores, kept_count(keep, p), method, eps=eps, generator=generator)
            dys = dy2.index_select(1, index)
            if scale is not None:
                dys.mul_(scale.to(dys.dtype))
            dx = (dys @ weight.index_select(0, index)).view(x_shape)
        if ctx.needs_input_grad[1]:
            if ctx.rows_drawn:
                dw = dy2.index_select(0, ctx.row_index).t() @ saved_x
            else:
                scores = _row_norms(saved_x) * _row_norms(dy2)
                rows = kept_count(keep, dy2.shape[0])
                index, scale = sample_pairs(scores, rows, method, eps=eps, generator=generator)
                dw = _scale_rows(dy2.index_select(0, index), scale).t() @ saved_x.index_select(0, index)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db, None, None, None, None, None


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
    # Exporters would see through the Function to an exact gradient anyway (design.md).
    if not training or exact or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return F.linear(x, weight, bias)
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return F.linear(x, weight, bias)  # nothing will be differentiated: nothing to sample
    return BackwardSampledLinearFn.apply(x, weight, bias, keep, method, eps, row_scores, generator)
