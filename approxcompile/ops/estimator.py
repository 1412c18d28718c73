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
    s = torch.where(torch.isnan(s), torch.zeros_like(s), s)
    s = torch.where(s == float("inf"), torch.full_like(s, torch.finfo(torch.float32).max), s)
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


def wta_bound(p: Tensor, shares: Tensor, k: int) -> Tensor:
    """The variance bound of WTA-CRS for every size ``c = 0 .. k-1`` of the deterministic set.

    ``p`` and ``shares`` (the scores over their sum) are in decreasing order of ``p``. With the
    ``c`` first pairs kept exactly and ``s = k - c`` draws from ``q_i = p_i/P_R`` on the rest
    ``R``, ``E|estimate - AB|_F^2 <= (1/s)·sum_R a_i^2/q_i = P_R·sum_R (a_i^2/p_i) / (k - c)``
    (CRS's bound, with ``a_i = |A[:, i]|·|B[i, :]|``). For ``p`` proportional to ``a`` that is
    ``(1 - P_C)^2·(sum a)^2 / (k - c)``: a larger deterministic set pays off while the
    probability mass it covers shrinks the remainder faster than it uses up draws.
    """
    # Tail sums by reversed cumulative sums: no 1 - P_C cancellation when P_C is close to 1.
    rest = torch.flip(torch.cumsum(torch.flip(p, [0]), 0), [0])[:k]
    spread = torch.flip(torch.cumsum(torch.flip(shares * shares / p, [0]), 0), [0])[:k]
    return rest * spread / (k - torch.arange(k, device=p.device, dtype=p.dtype))


def wta_plan(scores: Tensor, p: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """WTA-CRS's split of the pairs -> ``(order, sorted_p, c, rest_p)``.

    ``order``: the pairs by decreasing ``p``; ``sorted_p``: ``p`` in that order; ``c``: the size
    of the deterministic set (a 0-d int64 tensor in ``[0, k)``); ``rest_p``: ``sorted_p`` with
    its first ``c`` entries zeroed, the (unnormalised) distribution of the draws.
    ``k < n`` (the sampled ops are exact otherwise), so the remainder is never empty and its
    last pair, the least likely, is where a draw lands when rounding runs past the CDF.
    """
    a = _float32(scores)
    a = torch.where(torch.isfinite(a), a, torch.zeros_like(a)).clamp(min=0.0)
    total = a.sum()
    shares = a / torch.where(total > 0, total, torch.ones_like(total))
    sorted_p, order = torch.sort(p, descending=True)
    c = torch.argmin(wta_bound(sorted_p, shares.index_select(0, order), k))
    position = torch.arange(p.shape[0], device=p.device)
    rest_p = torch.where(position < c, torch.zeros_like(sorted_p), sorted_p)
    return order, sorted_p, c, rest_p


def wta_combine(
    order: Tensor, sorted_p: Tensor, c: Tensor, rest_p: Tensor, drawn: Tensor
) -> tuple[Tensor, Tensor]:
    """``(index, scale)``, sorted by index, from ``k`` draws (positions in ``order``) on ``rest_p``.

    Slot ``j < c`` keeps the ``j``-th most likely pair with scale 1; slot ``j >= c`` keeps draw
    ``j`` with scale ``P_R/((k-c)·p_i)``. Draws in slots below ``c`` are not used, so the
    draw count stays ``k`` whatever ``c`` is (static shapes: compiled and exported alike).
    """
    k = int(drawn.shape[0])
    slot = torch.arange(k, device=drawn.device)
    deterministic = slot < c
    position = torch.where(deterministic, slot, drawn)
    draws = (k - c).to(sorted_p.dtype)
    scale = torch.where(
        deterministic,
        torch.ones_like(sorted_p[:k]),
        rest_p.sum() / (draws * sorted_p.index_select(0, position)),
    )
    index, by_index = torch.sort(order.index_select(0, position))
    return index, scale.index_select(0, by_index)
