"""The estimator core: probabilities, draws from given uniforms, scales, shared by every backend.

A sampled product is ``sum_i A[:, i] B[i, :]`` restricted to the pairs a method picks, each
multiplied by its scale. From scores ``a_i = |A[:, i]|·|B[i, :]|``:

- ``topk``: the k largest scores, no scaling (deterministic, biased);
- ``crs``: k draws with replacement from ``p = (1-eps)·a/sum(a) + eps/n``, scale ``1/(k·p_i)``;
- ``bernoulli``: pair i kept with ``q_i = min(1, k·p_i)``, scale ``1/q_i``; when nothing is
  drawn, the most likely pair is kept with scale 0 (the estimate is 0, every shape stays
  non-empty and the gradients are zero);
- ``uniform``: k pairs uniformly without replacement, scale ``n/k``;
- ``wta_crs`` (winner-take-all column-row sampling, Liu et al. 2023): the ``c`` pairs with the
  largest ``p`` are kept exactly (scale 1) and ``k - c`` draws with replacement from ``p``
  restricted to the rest, scale ``P_R/((k-c)·p_i)`` with ``P_R`` the probability mass of the
  rest. ``c`` in ``[0, k)`` minimises the variance bound :func:`wta_bound`.

The runtime ops (``approxcompile.ops.sampling``) and their exportable twins
(``approxcompile.export.estimators``) both compute these with the functions below; they differ
only in how they gather and how they stop the gradient. Given the same uniform draws
(``noise``, :func:`noise_size` of them), both pick the same pairs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_EPS = 0.1

# F.conv{1,2,3}d by the number of spatial dimensions.
CONV: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _float32(t: Tensor) -> Tensor:
    # Only a real conversion: exported, a float32 -> float32 Cast crashes ONNX Runtime's
    # pre-training graph optimizer ("Argument mismatch when removing edge").
    return t if t.dtype == torch.float32 else t.float()


def noise_size(method: str, n: int, k: int) -> int:
    """How many uniform draws one sampling of ``k`` of ``n`` pairs reads (0 for ``topk``)."""
    return {"topk": 0, "crs": k, "wta_crs": k}.get(method, n)


def repeats(method: str) -> bool:
    """Whether ``method`` may keep one pair twice (draws with replacement): gathers then add up."""
    return method in ("crs", "wta_crs")


def probabilities(scores: Tensor, eps: float) -> Tensor:
    """``(1-eps)·a/sum(a) + eps/n``, with non-finite and negative scores read as 0.

    All-zero scores (dead ReLUs, zero weights) carry no information: uniform then, never 0/0.
    Written without data-dependent branches so that it exports as it runs.
    """
    n = int(scores.shape[0])
    a = _float32(scores)
    a = torch.where(torch.isfinite(a), a, torch.zeros_like(a)).clamp(min=0.0)
    total = a.sum()
    informative = torch.isfinite(total) & (total > 0)
    p = a / torch.where(informative, total, torch.ones_like(total)) * (1.0 - eps) + eps / n
    return torch.where(informative, p, torch.full_like(p, 1.0 / n))


def inclusion(p: Tensor, k: int) -> Tensor:
    """Bernoulli keep probabilities ``min(1, k·p_i)`` (their sum is at most ``k``)."""
    return (p * k).clamp(max=1.0)


def topk_index(scores: Tensor, k: int, *, ordered: bool = False) -> Tensor:
    """Sorted indices of the ``k`` largest scores (NaN counts as 0, +inf as the largest finite).

    ``ordered`` is ``torch.topk``'s ``sorted``: the exporter needs it on (ONNX ``TopK``); the
    runtime leaves it off, which is faster and, among tied scores, picks as it always did.
    """
    s = _float32(scores)
    big = torch.finfo(torch.float32).max
    if ordered:  # the exporter's path: ONNX has these ops (IsNaN, Where), not nan_to_num
        s = torch.where(torch.isnan(s), torch.zeros_like(s), s)
        s = torch.where(s == float("inf"), torch.full_like(s, big), s)
    else:  # the same values in one op instead of six (a draw is on every sampled layer's step)
        s = torch.nan_to_num(s, nan=0.0, posinf=big, neginf=float("-inf"))
    return torch.sort(torch.topk(s, k, sorted=ordered).indices).values


def uniform_index(u: Tensor, k: int) -> Tensor:
    """``k`` of ``n`` pairs without replacement from ``n`` uniforms: the k largest draws."""
    return torch.sort(torch.topk(u, k).indices).values


def inverse_cdf(p: Tensor, u: Tensor) -> Tensor:
    """One pair per uniform, in the uniforms' order: the number of CDF steps of ``p`` at or below it."""
    below = torch.cumsum(p, 0)[:-1].unsqueeze(0) <= u.unsqueeze(1)  # (k, n-1)
    return below.to(torch.int64).sum(1)


def crs_index(p: Tensor, u: Tensor) -> Tensor:
    """:func:`inverse_cdf`, sorted."""
    return torch.sort(inverse_cdf(p, u)).values


def crs_scale(p_kept: Tensor, k: int) -> Tensor:
    """The unbiased weight ``1/(k·p_i)`` of a pair drawn (with replacement) with probability ``p_i``."""
    return 1.0 / (k * p_kept)


def bernoulli_drawn(q: Tensor, u: Tensor) -> Tensor:
    """Which pairs a Bernoulli draw keeps: ``u_i < q_i``."""
    return u < q


def uniform_scale(n: int, k: int, like: Tensor) -> Tensor:
    """``n/k`` for each of the ``k`` kept pairs."""
    return torch.full((k,), n / k, device=like.device)


def scale_along(t: Tensor, scale: Tensor | None, dim: int) -> Tensor:
    """``t`` with index ``i`` of ``dim`` multiplied by ``scale[i]`` (``t`` itself when ``scale`` is None)."""
    if scale is None:
        return t
    shape = [1] * t.dim()
    shape[dim] = -1
    return t * (scale if scale.dtype == t.dtype else scale.to(t.dtype)).view(shape)


def wta_bound(top_p: Tensor, top_spread: Tensor, p_total: Tensor, spread_total: Tensor, k: int) -> Tensor:
    """The variance bound of WTA-CRS for every size ``c = 0 .. k-1`` of the deterministic set.

    ``top_p`` / ``top_spread``: ``p_i`` and ``s_i^2/p_i`` of the ``k`` most likely pairs, in
    decreasing order of ``p`` (``s_i``: the pair's share of the summed scores); ``p_total`` and
    ``spread_total``: the same summed over all pairs. With the ``c`` first pairs kept exactly
    and ``k - c`` draws from ``q_i = p_i/P_R`` on the rest ``R``, CRS's bound gives
    ``E|estimate - AB|_F^2 <= P_R·sum_R (s_i^2/p_i) / (k - c)``, up to the factor ``(sum a)^2``
    (``a_i = |A[:, i]|·|B[i, :]|``). For ``p`` proportional to ``a`` it is ``(1 - P_C)^2 / (k - c)``:
    a larger deterministic set pays off while the probability mass it covers shrinks the
    remainder faster than it uses up draws. Sums in float64: ``P_R`` is a difference.
    """
    rest = p_total - torch.cumsum(top_p.double(), 0) + top_p.double()  # mass outside the first c
    spread = spread_total - torch.cumsum(top_spread.double(), 0) + top_spread.double()
    return rest * spread / (k - torch.arange(k, device=top_p.device, dtype=torch.float64))


def wta_plan(scores: Tensor, p: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """WTA-CRS's split of the pairs -> ``(top, c, rest_p)``.

    ``top``: the ``k`` most likely pairs, most likely first; ``c``: the size of the
    deterministic set (a 0-d int64 tensor in ``[0, k)``), its first ``c`` entries;
    ``rest_p``: ``p`` with the deterministic set zeroed, the (unnormalised) law of the draws.
    ``k < n`` (the sampled ops are exact otherwise), so the rest is never empty.
    """
    a = _float32(scores)
    a = torch.where(torch.isfinite(a), a, torch.zeros_like(a)).clamp(min=0.0)
    total = a.sum()
    shares = a / torch.where(total > 0, total, torch.ones_like(total))
    spread = shares * shares / p
    top_p, top = torch.topk(p, k, sorted=True)
    bound = wta_bound(top_p, spread.index_select(0, top), p.double().sum(), spread.double().sum(), k)
    c = torch.argmin(bound)
    slot = torch.arange(k, device=p.device)
    in_top = torch.zeros_like(p, dtype=torch.bool).scatter(0, top, slot < c)
    return top, c, torch.where(in_top, torch.zeros_like(p), p)


def wta_draw(rest_p: Tensor, u: Tensor) -> Tensor:
    """:func:`inverse_cdf` of ``rest_p`` (normalised here), never landing on a zeroed pair.

    A zeroed pair has a CDF step of width 0, so no uniform falls in it, except past the end
    when ``u·total`` rounds up to the total: then the last pair of nonzero probability.
    """
    index = inverse_cdf(rest_p / rest_p.sum(), u)
    last = (torch.arange(rest_p.shape[0], device=rest_p.device) * (rest_p > 0)).max()
    return torch.minimum(index, last)


def wta_combine(p: Tensor, top: Tensor, c: Tensor, rest_p: Tensor, drawn: Tensor) -> tuple[Tensor, Tensor]:
    """``(index, scale)``, sorted by index, from ``k`` draws (pair indices) on ``rest_p``.

    Slot ``j < c`` keeps the ``j``-th most likely pair with scale 1; slot ``j >= c`` keeps draw
    ``j`` with scale ``P_R/((k-c)·p_i)``. Draws in slots below ``c`` are not used, so the
    draw count stays ``k`` whatever ``c`` is (static shapes: compiled and exported alike).
    """
    k = int(drawn.shape[0])
    deterministic = torch.arange(k, device=drawn.device) < c
    pairs = torch.where(deterministic, top, drawn)
    draws = (k - c).to(p.dtype)
    scale = torch.where(
        deterministic, torch.ones_like(p[:k]), rest_p.sum() / (draws * p.index_select(0, pairs))
    )
    index, by_index = torch.sort(pairs)
    return index, scale.index_select(0, by_index)
