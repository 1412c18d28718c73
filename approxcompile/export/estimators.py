"""The sampled products again, in plain tensor ops that export to ONNX and differentiate in ORT.

The runtime ops (``approxcompile.ops``) compute scores under ``torch.no_grad()`` and run a
custom ``autograd.Function``. Neither survives export: ``no_grad``/``detach`` leave no trace
in the ONNX graph, so ONNX Runtime would differentiate through the scores, probabilities
and scales, and ORT builds its own exact gradient in place of a custom backward. Here the
same estimators are written so that the *graph itself* stops the gradient:

- indices reach the product only through ``GatherND``'s index input (int64), a stop edge of
  ORT's gradient builder, so ``TopK`` / ``CumSum`` / comparisons on scores get no gradient;
- scales pass through :func:`stop_gradient`, an exact round trip through int64 (a ``Cast``
  to an integer type is also a stop edge, and ONNX has no StopGradient operator);
- Bernoulli draws are ``RandomUniformLike`` + ``Less`` (the ``Bernoulli`` operator has no
  gradient builder when its probabilities depend on trainable weights).

The kept slices of the product's operands are taken with :func:`take`, which exports as
``GatherND`` over the leading axis rather than ``Gather``: ORT's CPU ``GatherGrad`` (1.19.2)
takes a mutex for every element it scatters, and measured 145 ms of a 490 ms MLP training
step per 4096 x 4096 weight, against 15 ms for ``GatherNDGrad``. A sampled linear's weight
is exported transposed, ``(in, out)``, so that its kept rows are the leading axis and no
full-size ``Transpose`` runs each step (``transposed=True``, set by ``lower_for_export``).

::

    sampled_linear(x, W, b, keep=0.4, method='topk', training=training)
        -> export_linear(x, W, b, keep=0.4, method='topk', training=training)   # TopK, GatherND, Gemm

``noise`` is the uniform randomness (``n`` draws; ``k`` for ``crs`` and ``wta_crs``): ``None`` draws it inside
the graph (``RandomUniform``), a tensor feeds it in, so tests can give PyTorch and ONNX
Runtime the same draws. In eval mode, or when ``k >= n``, every op is the exact one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from approxcompile.ops import estimator
from approxcompile.ops.estimator import CONV, DEFAULT_EPS, noise_size, scale_along
from approxcompile.plan import kept_count

__all__ = [
    "export_addmm",
    "export_baddbmm",
    "export_conv",
    "export_linear",
    "export_matmul",
    "noise_size",
    "sample",
    "stop_gradient",
]

_MANTISSA_SHIFT = 40  # q = v * 2^(40 - e) is an integer below 2^42 (see stop_gradient)


def stop_gradient(t: Tensor) -> Tensor:
    """The values of ``t`` (finite, >= 0) with no gradient, in torch autograd and in ORT alike.

    ``v = q * 2^(e - 40)`` with ``e`` within one of ``v``'s binary exponent and ``q`` an
    integer below ``2^42``: both travel through int64, which ORT's gradient builder does not
    cross, and the float32 value comes back bit for bit.
    """
    d = t.double()
    positive = d > 0
    safe = torch.where(positive, d, torch.ones_like(d))
    e = torch.floor(torch.log2(safe)).to(torch.int64)
    shift = (_MANTISSA_SHIFT - e).double()
    q = (safe * torch.pow(2.0, shift)).to(torch.int64)
    value = q.double() * torch.pow(2.0, -shift)
    return torch.where(positive, value, torch.zeros_like(value)).to(t.dtype)


def _float(t: Tensor) -> Tensor:
    # A no-op Cast (float32 -> float32) crashes ORT's pre-training graph optimizer
    # ("Argument mismatch when removing edge"), so cast only when the dtype differs.
    return t if t.dtype == torch.float32 else t.float()


class _Take(torch.autograd.Function):
    """``t.index_select(dim, index)`` that exports as Transpose + ``GatherND`` + Transpose."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, t: Tensor, dim: int, rank: int, index: Tensor
    ) -> Tensor:
        ctx.save_for_backward(index)
        ctx.dim, ctx.shape = dim, t.shape  # type: ignore[attr-defined]
        return t.index_select(dim, index)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (index,) = ctx.saved_tensors  # type: ignore[attr-defined]
        full = grad.new_zeros(ctx.shape)  # type: ignore[attr-defined]
        return full.index_add_(ctx.dim, index, grad), None, None, None  # type: ignore[attr-defined]

    @staticmethod
    def symbolic(g: Any, t: Any, dim: int, rank: int, index: Any) -> Any:
        front = [dim, *(d for d in range(rank) if d != dim)]  # the sampled axis first
        if dim:
            t = g.op("Transpose", t, perm_i=front)
        rows = g.op("GatherND", t, g.op("Unsqueeze", index, g.op("Constant", value_t=torch.tensor([1]))))
        if not dim:
            return rows
        back = sorted(range(rank), key=front.__getitem__)  # the inverse permutation
        return g.op("Transpose", rows, perm_i=back)


def take(t: Tensor, dim: int, index: Tensor) -> Tensor:
    """The slices ``index`` of ``t`` along ``dim``: ``index_select``, exported as ``GatherND``."""
    return _Take.apply(t, dim % t.dim(), t.dim(), index)


def _norms(t: Tensor, dim: int) -> Tensor:
    dims = [d for d in range(t.dim()) if d != dim % t.dim()]
    # square-ReduceSum-Sqrt: ORT's ReduceL2 over the leading axis of a 4096 x 4096 weight
    # measured a third slower for the whole MLP training step (0.96x against 1.48x).
    return _float(t).square().sum(dims).sqrt()


def _uniform(noise: Tensor | None, size: int, like: Tensor) -> Tensor:
    if noise is not None:
        return _float(noise)
    return torch.rand(size, device=like.device)


def sample(
    scores: Tensor, k: int, method: str, *, eps: float = DEFAULT_EPS, noise: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """``scores`` (n,) -> ``(index, scale)``: the runtime's estimators, in exportable ops.

    ``topk``: TopK. ``uniform``: TopK of ``n`` uniforms, scale ``n/k``. ``crs``: inverse-CDF
    draws (``CumSum``, ``LessOrEqual``, ``ReduceSum``), scale ``1/(k p_i)``. ``wta_crs``: TopK, the
    split's argmin and the same inverse-CDF draws on the remainder. ``bernoulli``: ``u < k p``,
    ``NonZero``, scale ``1/p_i`` (one pair scaled by 0 when nothing is drawn, as the runtime).
    Scales pass through :func:`stop_gradient`.
    """
    n = int(scores.shape[0])
    if method == "topk":
        return estimator.topk_index(scores, k, ordered=True), None
    if method == "uniform":
        index = estimator.uniform_index(_uniform(noise, n, scores), k)
        return index, estimator.uniform_scale(n, k, scores)
    p = estimator.probabilities(scores, eps)
    if method == "crs":
        index = estimator.crs_index(p, _uniform(noise, k, scores))
        return index, stop_gradient(estimator.crs_scale(p.index_select(0, index), k))
    if method == "wta_crs":
        top, c, rest_p = estimator.wta_plan(scores, p, k)
        drawn = estimator.wta_draw(rest_p, _uniform(noise, k, scores))
        index, scale = estimator.wta_combine(p, top, c, rest_p, drawn)
        return index, stop_gradient(scale)
    if method == "bernoulli":
        drawn, fallback, scale = _bernoulli(p, k, _uniform(noise, n, scores))
        index = torch.nonzero(drawn | fallback).squeeze(1)
        return index, scale.index_select(0, index)
    raise ValueError(f"unknown sampling method {method!r}")


def _bernoulli(p: Tensor, k: int, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(drawn, fallback, scale)``, all of length n; ``scale`` is 0 where nothing is kept."""
    q = estimator.inclusion(p, k)
    drawn = estimator.bernoulli_drawn(q, u)
    # Nothing drawn: keep the most likely pair, scaled by 0, so every shape stays non-empty.
    fallback = (torch.arange(p.shape[0], device=p.device) == torch.argmax(q)) & ~drawn.any()
    return drawn, fallback, stop_gradient(torch.where(drawn, 1.0 / q, torch.zeros_like(q)))


def _slices(
    a: Tensor, a_dim: int, b: Tensor, b_dim: int, k: int, method: str, eps: float, noise: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Sampled slices of ``a`` and ``b``, the scale on the smaller one (as the runtime op)."""
    index, scale = sample(_norms(a, a_dim) * _norms(b, b_dim), k, method, eps=eps, noise=noise)
    a_s, b_s = take(a, a_dim, index), take(b, b_dim, index)
    if int(a.numel()) // int(a.shape[a_dim]) <= int(b.numel()) // int(b.shape[b_dim]):
        return scale_along(a_s, scale, a_dim), b_s
    return a_s, scale_along(b_s, scale, b_dim)


def export_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    keep: float,
    method: str = "topk",
    training: bool = True,
    eps: float = DEFAULT_EPS,
    noise: Tensor | None = None,
    transposed: bool = False,
) -> Tensor:
    """``sampled_linear`` -> GatherND of ``x`` columns and ``W`` columns, scale on ``x``, then Gemm.

    ``transposed=True``: ``weight`` is stored ``(in, out)``, so its kept rows are taken and the
    product is a plain MatMul (``x @ weight + bias`` when nothing is sampled).
    """
    n = int(weight.shape[0 if transposed else -1])
    k = kept_count(keep, n)
    if not training or k >= n:
        return _dense(x, weight, bias, transposed)
    w_dim = 0 if transposed else 1  # the input-feature axis of the stored weight
    index, scale = sample(_norms(x, -1) * _norms(weight, w_dim), k, method, eps=eps, noise=noise)
    xs = scale_along(take(x, -1, index), scale, -1)
    return _dense(xs, take(weight, w_dim, index), bias, transposed)


def _dense(x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
    if not transposed:
        return F.linear(x, weight, bias)
    y = torch.matmul(x, weight)
    return y if bias is None else y + bias


def export_matmul(
    a: Tensor,
    b: Tensor,
    *,
    keep: float,
    method: str = "topk",
    training: bool = True,
    eps: float = DEFAULT_EPS,
    noise: Tensor | None = None,
) -> Tensor:
    """``sampled_matmul`` -> GatherND of the contracted slices of ``a`` and ``b``, then MatMul."""
    n = int(a.shape[-1])
    if not training or a.dim() < 2 or b.dim() < 2 or kept_count(keep, n) >= n:
        return torch.matmul(a, b)
    return torch.matmul(*_slices(a, -1, b, -2, kept_count(keep, n), method, eps, noise))


def export_addmm(
    bias: Tensor,
    a: Tensor,
    b: Tensor,
    *,
    keep: float,
    method: str = "topk",
    training: bool = True,
    eps: float = DEFAULT_EPS,
    noise: Tensor | None = None,
) -> Tensor:
    """``sampled_addmm`` -> GatherND of the contracted slices, then Gemm."""
    n = int(a.shape[-1])
    k = kept_count(keep, n)
    if not training or k >= n:
        return torch.addmm(bias, a, b)
    return torch.addmm(bias, *_slices(a, -1, b, 0, k, method, eps, noise))


def export_baddbmm(
    bias: Tensor,
    a: Tensor,
    b: Tensor,
    *,
    keep: float,
    method: str = "topk",
    training: bool = True,
    eps: float = DEFAULT_EPS,
    noise: Tensor | None = None,
) -> Tensor:
    """``sampled_baddbmm`` -> GatherND of the contracted slices of both batches, then MatMul + Add."""
    n = int(a.shape[-1])
    k = kept_count(keep, n)
    if not training or k >= n:
        return torch.baddbmm(bias, a, b)
    return torch.baddbmm(bias, *_slices(a, -1, b, -2, k, method, eps, noise))


def export_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: str | int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    *,
    keep: float,
    method: str = "topk",
    training: bool = True,
    eps: float = DEFAULT_EPS,
    noise: Tensor | None = None,
) -> Tensor:
    """``sampled_conv`` -> GatherND of input channels of ``x`` and ``W``, then Conv."""
    conv = CONV[weight.dim() - 2]
    n = int(weight.shape[1])
    k = kept_count(keep, n)
    if not training or k >= n or x.dim() != weight.dim():
        return conv(x, weight, bias, stride, padding, dilation)
    if method == "bernoulli":
        # Bernoulli keeps a data-dependent channel count, and the TorchScript exporter refuses
        # a Conv whose kernel shape is unknown. Zeroing the channels not drawn gives the same
        # estimate and the same (zero) gradients for them, without the compute saving.
        scores = _norms(x, 1) * _norms(weight, 1)
        _, _, scale = _bernoulli(estimator.probabilities(scores, eps), k, _uniform(noise, n, scores))
        return conv(scale_along(x, scale, 1), weight, bias, stride, padding, dilation)
    xs, ws = _slices(x, 1, weight, 1, k, method, eps, noise)
    return conv(xs, ws, bias, stride, padding, dilation)
