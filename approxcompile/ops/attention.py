"""Activation × activation products sampled per (batch, head) slice: batched matmuls and attention.

::

    matmul(a, b)                     (mode="backward") -> backward_sampled_matmul(a, b, keep=0.4, ...)
    sdpa(q, k, v, mask, p, causal, scale)              -> sampled_attention(q, k, v, mask, p, causal,
                                                           scale, keep=0.4, method='topk', ...)
    sdpa(q, k, v, mask, p, causal, scale)  (backward)  -> backward_sampled_attention(q, k, v, ...)

Both factors of these products are activations, so no index set fits every batch entry:
each (batch, head) slice ``g`` draws its own column-row pairs from its own scores, as WTA-CRS
does for attention. The leading dimensions are flattened to ``G`` slices, ``(G, m, n) @ (G, n, p)``.

- **Forward mode** (``sampled_attention``): ``scaled_dot_product_attention`` taken apart into
  ``Q·Kᵀ`` (sampled over the head dimension E), mask, softmax, dropout and ``P·V`` (sampled over
  the key positions S), both at ratio ``keep``; autograd differentiates through the gathers.
- **Backward mode**: the forward is exact; in backward ``dA = dY·Bᵀ`` keeps ``keep·p`` of the
  output columns of each slice (score ``|dY[g, :, j]|·|B[g, :, j]|``) and ``dB = Aᵀ·dY`` keeps
  ``keep·m`` of its rows (score ``|A[g, i]|·|dY[g, i]|``). Only unbiased methods are accepted,
  so ``E[dÂ] = dA`` and ``E[dB̂] = dB``. ``bernoulli`` keeps a random count per slice: the
  slices are padded to the largest count with pairs scaled by 0.

With ``training=False`` every op is the exact one (the fused kernel for attention). The draws
are ``torch.library`` custom ops with fake kernels (``torch.compile`` keeps them in one graph),
tagged ``nondeterministic_seeded`` like :func:`approxcompile.ops.draw.draw`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from approxcompile.ops.amp import refuse_double_backward
from approxcompile.ops.backward import check_backward_method
from approxcompile.ops.draw import generator_handle, lookup
from approxcompile.ops.estimator import DEFAULT_EPS
from approxcompile.ops.kernels import autocast_inputs
from approxcompile.ops.sampling import sample_pairs
from approxcompile.plan import kept_count


def _row_probabilities(scores: Tensor, eps: float) -> Tensor:
    """Row-wise ``(1-eps)·a/sum(a) + eps/n``; a row without information is uniform."""
    n = scores.shape[1]
    a = scores.float()
    a = torch.where(torch.isfinite(a), a, torch.zeros_like(a)).clamp(min=0.0)
    total = a.sum(1, keepdim=True)
    informative = torch.isfinite(total) & (total > 0)
    p = a / torch.where(informative, total, torch.ones_like(total)) * (1.0 - eps) + eps / n
    return torch.where(informative, p, torch.full_like(p, 1.0 / n))


def slice_pairs(
    scores: Tensor, k: int, method: str, eps: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """``scores`` (G, n) -> ``(index, scale)``, both (G, c): each row drawn on its own.

    ``scale`` is empty for ``topk``. ``bernoulli`` pads every row to the largest kept count
    with pairs whose scale is 0, so each pair ``i`` of a row still contributes ``kept_i / q_i``.
    """
    g, n = scores.shape
    if method == "topk":
        s = torch.nan_to_num(scores.float(), nan=0.0)
        return torch.topk(s, k, dim=1, sorted=False).indices, scores.new_empty(0, dtype=torch.float32)
    if method == "uniform":
        u = torch.rand(g, n, device=scores.device, generator=generator)
        return torch.topk(u, k, dim=1, sorted=False).indices, torch.full((g, k), n / k, device=scores.device)
    p = _row_probabilities(scores, eps)
    if method == "crs":
        index = torch.multinomial(p, k, replacement=True, generator=generator)
        return index, 1.0 / (k * p.gather(1, index))
    if method == "bernoulli":
        q = (p * k).clamp(max=1.0)
        kept = torch.rand(g, n, device=scores.device, generator=generator) < q
        count = max(int(kept.sum(1).max()), 1)
        # kept pairs first in each row (stable: ascending), then the padding
        index = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)[:, :count]
        scale = torch.where(kept.gather(1, index), 1.0 / q.gather(1, index), torch.zeros((), device=q.device))
        return index, scale
    return rowwise_pairs(scores, k, method, eps, generator)


def rowwise_pairs(
    scores: Tensor, k: int, method: str, eps: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """One :func:`~approxcompile.ops.sampling.sample_pairs` draw per row, padded with 0-scaled pairs.

    For a method :func:`slice_pairs` has no vectorised draw for (a G-step loop, but any method
    ``sample_pairs`` knows works here, with its own unbiasedness).
    """
    rows = [sample_pairs(row, k, method, eps=eps, generator=generator) for row in scores]
    width = max(i.numel() for i, _ in rows)
    index = torch.zeros(len(rows), width, dtype=torch.long, device=scores.device)
    scale = torch.zeros(len(rows), width, device=scores.device)
    for r, (i, s) in enumerate(rows):
        index[r, : i.numel()] = i
        scale[r, : i.numel()] = 1.0 if s is None else s
    return index, scale


@torch.library.custom_op(
    "approxcompile::draw_per_slice", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,)
)
def draw_per_slice(
    scores: Tensor, k: int, method: str, eps: float, generator: int | None
) -> tuple[Tensor, Tensor]:
    """:func:`slice_pairs` as one graph node: ``scores`` (G, n) -> ``(index, scale)``."""
    return slice_pairs(scores, k, method, eps, lookup(generator))


@draw_per_slice.register_fake
def _draw_per_slice_fake(
    scores: Tensor, k: int, method: str, eps: float, generator: int | None
) -> tuple[Tensor, Tensor]:
    c: int | torch.SymInt = k
    if method not in ("topk", "uniform", "crs"):  # bernoulli, or a row-wise draw: padded to a random width
        c = torch.library.get_ctx().new_dynamic_size()
    index = scores.new_empty((scores.shape[0], c), dtype=torch.long)
    return index, scores.new_empty(0 if method == "topk" else (scores.shape[0], c), dtype=torch.float32)


def _take(t: Tensor, dim: int, index: Tensor, scale: Tensor | None = None) -> Tensor:
    """Slice ``index[g]`` of ``t[g]`` (3-D) along ``dim`` (1 or 2), times ``scale[g]`` if given."""
    g, c = index.shape
    shape = (g, c, t.shape[2]) if dim == 1 else (g, t.shape[1], c)
    picked = t.gather(dim, index.unsqueeze(3 - dim).expand(shape))
    if scale is None or scale.numel() == 0:
        return picked
    return picked * scale.to(picked.dtype).unsqueeze(3 - dim)


def _norms(t: Tensor, dim: int) -> Tensor:
    # square-and-sum: linalg.vector_norm over a non-innermost dimension measured 2-3x slower on CPU
    return t.float().square().sum(dim).sqrt()


def sampled_bmm(a: Tensor, b: Tensor, k: int, method: str, eps: float, generator: int | None) -> Tensor:
    """``a @ b`` for ``a`` (G, m, n), ``b`` (G, n, p) over ``k`` of the ``n`` pairs of each slice."""
    with torch.no_grad():
        scores = _norms(a, 1) * _norms(b, 2)
    index, scale = draw_per_slice(scores, k, method, eps, generator)
    return torch.bmm(_take(a, 2, index, scale), _take(b, 1, index))


# -- backward mode: an exact bmm whose two gradient products are sampled per slice ------------


@torch.library.custom_op(
    "approxcompile::backward_sampled_bmm", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,)
)
def _bmm_forward(a: Tensor, b: Tensor, keep: float, method: str, eps: float, generator: int | None) -> Tensor:
    """``a @ b`` exactly (G, m, n) @ (G, n, p); the sample is drawn in backward."""
    return torch.bmm(a, b)


@_bmm_forward.register_fake
def _bmm_forward_fake(
    a: Tensor, b: Tensor, keep: float, method: str, eps: float, generator: int | None
) -> Tensor:
    return a.new_empty((a.shape[0], a.shape[1], b.shape[2]))


@torch.library.custom_op(
    "approxcompile::backward_sampled_bmm_grads",
    mutates_args=(),
    tags=(torch.Tag.nondeterministic_seeded,),
)
def _bmm_grads(
    dy: Tensor,
    a: Tensor | None,
    b: Tensor | None,
    keep: float,
    method: str,
    eps: float,
    generator: int | None,
) -> tuple[Tensor, Tensor]:
    """``(dA, dB)``, each sampled per slice; ``dA`` needs ``b``, ``dB`` needs ``a`` (else empty).

    ``dA = dY·Bᵀ`` sums over the p output columns, ``dB = Aᵀ·dY`` over the m rows.
    """
    gen = lookup(generator)
    da = db = dy.new_empty(0)
    if b is not None:
        p = dy.shape[2]
        index, scale = slice_pairs(_norms(dy, 1) * _norms(b, 1), kept_count(keep, p), method, eps, gen)
        da = torch.bmm(_take(dy, 2, index, scale), _take(b, 2, index).transpose(1, 2))
    if a is not None:
        m = dy.shape[1]
        index, scale = slice_pairs(_norms(a, 2) * _norms(dy, 2), kept_count(keep, m), method, eps, gen)
        db = torch.bmm(_take(a, 1, index).transpose(1, 2), _take(dy, 1, index, scale))
    return da, db


@_bmm_grads.register_fake
def _bmm_grads_fake(
    dy: Tensor,
    a: Tensor | None,
    b: Tensor | None,
    keep: float,
    method: str,
    eps: float,
    generator: int | None,
) -> tuple[Tensor, Tensor]:
    da = dy.new_empty((dy.shape[0], dy.shape[1], b.shape[1])) if b is not None else dy.new_empty(0)
    db = dy.new_empty((dy.shape[0], a.shape[2], dy.shape[2])) if a is not None else dy.new_empty(0)
    return da, db


def _bmm_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    a, b, keep, method, eps, generator = inputs
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ctx.save_for_backward(a if need_b else None, b if need_a else None)
    ctx.sample = (keep, method, eps, generator)


def _bmm_backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
    refuse_double_backward("backward_sampled_matmul")
    a, b = ctx.saved_tensors
    da, db = torch.ops.approxcompile.backward_sampled_bmm_grads(dy.contiguous(), a, b, *ctx.sample)
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    return (da if need_a else None, db if need_b else None, None, None, None, None)


_bmm_forward.register_autograd(_bmm_backward, setup_context=_bmm_setup)


def _batched(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """``a`` (..., m, n), ``b`` (..., n, p) broadcast and flattened to (G, m, n), (G, n, p)."""
    batch = tuple(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    a3 = a.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
    b3 = b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    return a3, b3, batch


def _backward_sampling_off(training: bool, *tensors: Tensor | None) -> bool:
    """True when nothing would be sampled: eval, exporting, or no gradient to take."""
    return (
        not training
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or not torch.is_grad_enabled()
        or not any(t is not None and t.requires_grad for t in tensors)
    )


def backward_sampled_matmul(
    a: Tensor,
    b: Tensor,
    *,
    keep: float,
    method: str = "bernoulli",
    training: bool = True,
    eps: float = DEFAULT_EPS,
    generator: torch.Generator | None = None,
    row_scores: str = "x_dy",
) -> Tensor:
    """``torch.matmul(a, b)`` exactly, with both gradients sampled per (batch, head) slice.

    ``row_scores`` is accepted for the rewrite's sake and has no effect: the rows of ``dB``
    are always scored by ``|A[g, i]|·|dY[g, i]|`` (an activation factor has no rows to draw
    in forward that would be cheaper to keep).

    >>> s = backward_sampled_matmul(q, k.transpose(-2, -1), keep=0.25)  # (B, H, L, E) @ (B, H, E, S)
    """
    check_backward_method(method)
    if a.dim() < 2 or b.dim() < 2 or a.numel() == 0 or b.numel() == 0:
        return torch.matmul(a, b)
    m, p = a.shape[-2], b.shape[-1]
    exact = kept_count(keep, p) >= p and kept_count(keep, m) >= m
    if exact or _backward_sampling_off(training, a, b):
        return torch.matmul(a, b)
    a, b, _ = autocast_inputs(a, b, None)
    a3, b3, batch = _batched(a, b)
    return _bmm_forward(a3, b3, keep, method, eps, generator_handle(generator)).view(*batch, m, p)


# -- scaled_dot_product_attention, taken apart --------------------------------------------


def _flatten_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, tuple[int, ...]]:
    """(G, L, E), (G, S, E), (G, S, Ev), the additive bias (G, L, S) or None, the batch shape."""
    batch = tuple(torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2]))
    q3, k3, v3 = (t.expand(*batch, *t.shape[-2:]).reshape(-1, *t.shape[-2:]) for t in (q, k, v))
    length, source = q.shape[-2], k.shape[-2]
    bias: Tensor | None = None
    if is_causal:
        allowed = torch.ones(length, source, dtype=torch.bool, device=q.device).tril()
        bias = torch.zeros(length, source, dtype=q.dtype, device=q.device).masked_fill(
            ~allowed, float("-inf")
        )
    if attn_mask is not None:
        mask = attn_mask
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        bias = mask if bias is None else bias + mask
    if bias is not None:
        bias = bias.expand(*batch, length, source).reshape(-1, length, source)
    return q3, k3, v3, bias, batch


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    product: Any,
) -> Tensor:
    """The math of sdpa with ``product(a, b, which)`` for its two products (``which``: "qk" or "pv")."""
    q3, k3, v3, bias, batch = _flatten_attention(q, k, v, attn_mask, is_causal)
    factor = scale if scale is not None else q.shape[-1] ** -0.5
    logits = product(q3 * factor, k3.transpose(1, 2), "qk")
    if bias is not None:
        logits = logits + bias
    probs = torch.softmax(logits, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p, training=True)
    return product(probs, v3, "pv").view(*batch, q.shape[-2], v.shape[-1])


def sampled_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    keep: float,
    method: str = "topk",
    training: bool = True,
    eps: float = DEFAULT_EPS,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``F.scaled_dot_product_attention``, its two products sampled per (batch, head) slice.

    ``Q·Kᵀ`` runs over ``keep·E`` of the head dimension, ``P·V`` over ``keep·S`` of the keys.

    ``dropout_p`` is applied as given (the export frontend gates it on ``self.training``);
    in eval (``training=False``) this is the fused op itself.
    """
    e, s = q.shape[-1], k.shape[-2]
    k_e, k_s = kept_count(keep, e), kept_count(keep, s)
    if not training or (k_e >= e and k_s >= s) or q.numel() == 0 or k.numel() == 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale)
    handle = generator_handle(generator)
    kept = {"qk": k_e, "pv": k_s}

    def product(a: Tensor, b: Tensor, which: str) -> Tensor:
        n = a.shape[2]
        return torch.bmm(a, b) if kept[which] >= n else sampled_bmm(a, b, kept[which], method, eps, handle)

    return _attend(q, k, v, attn_mask, dropout_p, is_causal, scale, product)


def backward_sampled_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    keep: float,
    method: str = "bernoulli",
    training: bool = True,
    eps: float = DEFAULT_EPS,
    generator: torch.Generator | None = None,
    row_scores: str = "x_dy",
) -> Tensor:
    """``F.scaled_dot_product_attention`` exactly (unfused); its gradient products sampled per slice.

    The four gradient products (dQ, dK of ``Q·Kᵀ``; dP, dV of ``P·V``) are drawn per (batch,
    head) slice with an unbiased method.
    """
    check_backward_method(method)
    dims = (q.shape[-2], k.shape[-2], v.shape[-1])  # L, S, Ev: the gradient products' inner dimensions
    exact = all(kept_count(keep, n) >= n for n in dims) or q.numel() == 0 or k.numel() == 0
    if exact or _backward_sampling_off(training, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale)
    handle = generator_handle(generator)

    def product(a: Tensor, b: Tensor, which: str) -> Tensor:
        a, b, _ = autocast_inputs(a, b, None)
        return _bmm_forward(a, b, keep, method, eps, handle)

    return _attend(q, k, v, attn_mask, dropout_p, is_causal, scale, product)
