"""Sampled products in forward-sampling mode: the graph calls these in place of the exact op.

The rewrite pass emits, for example::

    linear(x, W, b)           -> sampled_linear(x, W, b, keep=0.35, method='topk', training=training)
    matmul(q, k_t)            -> sampled_matmul(q, k_t, keep=0.5, method='topk', training=training)
    addmm(b, x, w_t)          -> sampled_addmm(b, x, w_t, keep=0.5, method='topk', training=training)
    baddbmm(b, q, k_t)        -> sampled_baddbmm(b, q, k_t, keep=0.5, method='topk', training=training)
    conv2d(x, W, b, s, p, d)  -> sampled_conv(x, W, b, s, p, d, keep=0.4, method='topk', training=training)

In training mode each op samples its inner dimension once in the forward pass and
autograd backpropagates through the gathered slices, so the output, input-gradient and
weight-gradient products all shrink by ``k/n``; weight slices that were not sampled get
a zero gradient that step. With ``training=False``, or when ``keep`` rounds to ``k >= n``,
the op is the exact one.

These are the runtime ops; ``approxcompile.export_onnx`` first lowers every call to an
exportable twin in plain tensor ops (``approxcompile/export/estimators.py``).

Under ``torch.compile`` these functions are traced like any Python: the scores become
Inductor code, the draw and the linear / conv products are custom ops (``draw.py``,
``kernels.py``), so a rewritten model compiles as one graph (``fullgraph=True``).

Mixed precision: under ``torch.autocast`` a sampled op computes in the autocast dtype, as
the exact op it replaces does (``F.linear``, ``F.conv2d``, ``torch.matmul`` and
``torch.addmm`` are on autocast's lower-precision list): floating inputs other than float64
are cast first, and gradients come back in each input's own dtype. The sampled linear casts
only the gathered slices (``compute`` of ``sampled_linear_product``), not the whole weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from approxcompile.ops.draw import draw_pairs
from approxcompile.ops.estimator import CONV, DEFAULT_EPS, repeats, scale_along
from approxcompile.ops.kernels import (
    autocast_compute,
    autocast_inputs,
    channel_norms,
    column_norms,
    column_squares,
    conv_product,
    linear_product,
    live_conv,
    plain_call,
    select,
    slice_norms,
    weight_norms,
)
from approxcompile.ops.small import small, small_linear
from approxcompile.plan import kept_count


def _check_scores(scores: str) -> bool:
    """True for weight-only scores."""
    if scores not in ("activations", "weights"):
        raise ValueError(f"scores must be 'activations' or 'weights', got {scores!r}")
    return scores == "weights"


def _sample_slices(
    a: Tensor,
    a_dim: int,
    b: Tensor,
    b_dim: int,
    k: int,
    method: str,
    eps: float,
    generator: torch.Generator | None,
    by_b: bool = False,
    noise: Tensor | None = None,
    seed: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Gather the sampled slices of ``a`` (along ``a_dim``) and ``b`` (along ``b_dim``).

    The sum over the inner dimension of ``a`` times ``b`` restricted to these slices is the
    sampled product. The scale multiplies whichever slice is smaller: the product and
    every gradient are the same either way.
    """
    with torch.no_grad():
        scores = slice_norms(b, b_dim) if by_b else slice_norms(a, a_dim) * slice_norms(b, b_dim)
    index, scale = draw_pairs(scores, b, k, method, eps=eps, seed=seed, generator=generator, noise=noise)
    a_s = select(a, a_dim, index)
    b_s = select(b, b_dim, index)
    if a_s.numel() <= b_s.numel():
        return scale_along(a_s, scale, a_dim), b_s
    return a_s, scale_along(b_s, scale, b_dim)


def sampled_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    keep: float,
    method: str = "topk",
    training: bool = True,
    eps: float = DEFAULT_EPS,
    generator: torch.Generator | None = None,
    scores: str = "activations",
    seed: int | None = None,
    noise: Tensor | None = None,
    weight_norms_every: int = 1,
) -> Tensor:
    """``F.linear(x, weight, bias)`` over a sample of the input features.

    ``scores="weights"`` scores feature i by ``|W[:, i]|`` alone and draws from the weight's
    own stream seeded with ``seed`` (``approxcompile.ops.shared``), so data-parallel ranks agree.
    ``noise`` (every op here): uniform draws to use instead of drawing (``estimator.noise_size``
    of them); the export twin fed the same draws keeps the same pairs.
    ``weight_norms_every``: reuse ``|W[:, i]|`` until the weight has been updated that many
    times (``kernels.weight_norms``; ``ApproxConfig.weight_norms_every``).

    >>> y = sampled_linear(torch.randn(8, 64), torch.randn(32, 64), keep=0.25)  # k = 16 of 64
    """
    n = weight.shape[-1]
    k = kept_count(keep, n)
    if not training or k >= n or x.numel() == 0:
        return F.linear(x, weight, bias)
    by_weights = _check_scores(scores)
    with torch.no_grad():
        if method == "topk":  # squared norms rank the columns alike: no square roots
            w_norms = weight_norms(weight, weight_norms_every, column_squares)
            a = w_norms if by_weights else column_squares(x.reshape(-1, n)).mul_(w_norms)
        else:
            w_norms = weight_norms(weight, weight_norms_every, column_norms)
            a = w_norms if by_weights else column_norms(x.reshape(-1, n)).mul_(w_norms)
    seed = seed if by_weights else None
    plain = plain_call(x, weight, bias)
    index, scale = draw_pairs(
        a, weight, k, method, eps=eps, seed=seed, generator=generator, noise=noise, plain=plain
    )
    if plain and small(x, weight, index.numel()):
        return small_linear(x, weight, bias, index, scale, not repeats(method))
    compute = autocast_compute(x, weight, bias)
    if compute is None:  # autocast off, or float64 operands: the inputs as autocast would pass them
        x, weight, bias = autocast_inputs(x, weight, bias)
    # Otherwise the op casts only the gathered slices to ``compute``, never the whole weight.
    return linear_product(plain, x, weight, bias, index, scale, not repeats(method), compute)[0]


def sampled_matmul(
    a: Tensor,
    b: Tensor,
    *,
    keep: float,
    method: str = "topk",
    training: bool = True,
    eps: float = DEFAULT_EPS,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """``torch.matmul(a, b)`` over a sample of the contracted dimension.

    One set of indices serves every batch entry (scores sum over the batch dims), so
    ``(B, m, n) @ (B, n, p)`` gathers ``(B, m, k) @ (B, k, p)``.
    """
    if a.dim() < 2 or b.dim() < 2 or a.numel() == 0 or b.numel() == 0:
        return torch.matmul(a, b)
    n = a.shape[-1]
    k = kept_count(keep, n)
    if not training or k >= n or a.numel() == 0 or b.numel() == 0:
        return torch.matmul(a, b)
    a_s, b_s = _sample_slices(a, -1, b, -2, k, method, eps, generator, noise=noise)
    return torch.matmul(a_s, b_s)


def sampled_addmm(
    bias: Tensor,
    a: Tensor,
    b: Tensor,
    *,
    keep: float,
    method: str = "topk",
    training: bool = True,
    eps: float = DEFAULT_EPS,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """``torch.addmm(bias, a, b)`` over a sample of the contracted dimension."""
    n = a.shape[-1]
    k = kept_count(keep, n)
    if not training or k >= n or a.numel() == 0 or b.numel() == 0:
        return torch.addmm(bias, a, b)
    a_s, b_s = _sample_slices(a, -1, b, 0, k, method, eps, generator, noise=noise)
    return torch.addmm(bias, a_s, b_s)


def sampled_baddbmm(
    bias: Tensor,
    a: Tensor,
    b: Tensor,
    *,
    keep: float,
    method: str = "topk",
    training: bool = True,
    eps: float = DEFAULT_EPS,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """``torch.baddbmm(bias, a, b)`` over a sample of the contracted dimension, one for the whole batch."""
    n = a.shape[-1]
    k = kept_count(keep, n)
    if not training or k >= n or a.numel() == 0 or b.numel() == 0:
        return torch.baddbmm(bias, a, b)
    a_s, b_s = _sample_slices(a, -1, b, -2, k, method, eps, generator, noise=noise)
    return torch.baddbmm(bias, a_s, b_s)


def sampled_conv(
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
    generator: torch.Generator | None = None,
    scores: str = "activations",
    seed: int | None = None,
    noise: Tensor | None = None,
    weight_norms_every: int = 1,
    live: int | None = None,
) -> Tensor:
    """``F.conv{1,2,3}d(x, weight, bias, stride, padding, dilation)`` over a sample of input channels.

    Only ``groups=1`` convolutions of batched inputs are sampled; channel ``c`` scores
    ``|x[:, c]|_F * |W[:, c]|_F`` (``|W[:, c]|_F`` alone with ``scores="weights"``, as
    :func:`sampled_linear`, and reused as there with ``weight_norms_every``). ``live``: at most
    this many output channels get a nonzero gradient (set by the rewrite,
    ``passes.rewrite.live_bound``); an exact call passes it to
    :func:`~approxcompile.ops.kernels.live_conv`, whose compiled backward then skips the rest.
    """
    conv = CONV[weight.dim() - 2]
    n = weight.shape[1]
    k = kept_count(keep, n)
    d = weight.dim() - 2
    if training and k >= n and x.dim() == weight.dim() and not isinstance(padding, str):
        # Exact, in training: its backward skips the output channels a sampled conv after
        # it left without gradient.
        return live_conv(x, weight, bias, _ints(stride, d), _ints(padding, d), _ints(dilation, d), live)
    if not training or k >= n or x.dim() != weight.dim() or x.numel() == 0:
        return conv(x, weight, bias, stride, padding, dilation)
    by_weights = _check_scores(scores)
    seed = seed if by_weights else None
    if isinstance(padding, str):  # 'same' / 'valid': let F.conv resolve the padding
        xs, ws = _sample_slices(x, 1, weight, 1, k, method, eps, generator, by_weights, noise, seed)
        return conv(xs, ws, bias, stride, padding, dilation)
    with torch.no_grad():
        w_norms = weight_norms(weight, weight_norms_every, channel_norms)
        a = w_norms if by_weights else slice_norms(x, 1).mul_(w_norms)
    plain = plain_call(x, weight, bias)
    index, scale = draw_pairs(
        a, weight, k, method, eps=eps, seed=seed, generator=generator, noise=noise, plain=plain
    )
    x, w, b = autocast_inputs(x, weight, bias)
    unique = not repeats(method)
    return conv_product(
        plain, x, w, b, index, scale, unique, _ints(stride, d), _ints(padding, d), _ints(dilation, d)
    )[0]


def _ints(v: int | Sequence[int], d: int) -> list[int]:
    return [int(v)] * d if isinstance(v, int) else [int(e) for e in v]
