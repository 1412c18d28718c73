"""The estimator core: probabilities, draws from given uniforms, scales, shared by every backend.

A sampled product is ``sum_i A[:, i] B[i, :]`` restricted to the pairs a method picks, each
multiplied by its scale. From scores ``a_i = |A[:, i]|·|B[i, :]|``:

- ``topk``: the k largest scores, no scaling (deterministic, biased);
- ``crs``: k draws with replacement from ``p = (1-eps)·a/sum(a) + eps/n``, scale ``1/(k·p_i)``;
- ``bernoulli``: pair i kept with ``q_i = min(1, k·p_i)``, scale ``1/q_i``; when nothing is
  drawn, the most likely pair is kept with scale 0 (the estimate is 0, every shape stays
  non-empty and the gradients are zero);
- ``uniform``: k pairs uniformly without replacement, scale ``n/k``.

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
    return {"topk": 0, "crs": k}.get(method, n)


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


def crs_index(p: Tensor, u: Tensor) -> Tensor:
    """One pair per uniform by the inverse CDF of ``p``: the number of CDF steps at or below it."""
    below = torch.cumsum(p, 0)[:-1].unsqueeze(0) <= u.unsqueeze(1)  # (k, n-1)
    return torch.sort(below.to(torch.int64).sum(1)).values


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
