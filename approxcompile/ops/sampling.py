"""Which column-row pairs to keep, and how to rescale them, in the runtime ops.

The methods, their probabilities and scales are those of :mod:`approxcompile.ops.estimator`
(shared with the exportable twins). Scores ``a_i = |A[:, i]| * |B[i, :]|`` come from the
caller. Indices come back sorted so gathers read memory in order. Randomness uses torch's
generator (``torch.manual_seed``) unless one is passed; ``noise`` (uniform draws, as many as
``estimator.noise_size``) replaces the draws, and then the export twin picks the same pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from approxcompile.ops import estimator
from approxcompile.ops.estimator import DEFAULT_EPS

__all__ = ["DEFAULT_EPS", "sample_pairs"]


def sample_pairs(
    scores: Tensor,
    k: int,
    method: str,
    *,
    eps: float = DEFAULT_EPS,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Pick pairs from ``scores`` (shape ``(n,)``): returns ``(index, scale)``.

    ``index`` is a sorted int64 vector (``crs`` and ``wta_crs`` may repeat an index, ``bernoulli`` returns a
    random count with expectation at most k); ``scale`` is ``None`` for ``topk``, else a
    float32 vector of the same length as ``index``.
    """
    n = scores.numel()
    device = scores.device
    if method == "topk":
        return estimator.topk_index(scores, k), None
    if method == "uniform":
        if noise is None:
            index = torch.sort(torch.randperm(n, device=device, generator=generator)[:k]).values
        else:
            index = estimator.uniform_index(noise.to(device), k)
        return index, estimator.uniform_scale(n, k, scores)
    p = estimator.probabilities(scores, eps)
    if method == "crs":
        if noise is None:
            index = torch.sort(torch.multinomial(p, k, replacement=True, generator=generator)).values
        else:
            index = estimator.crs_index(p, noise.to(device).float())
        return index, estimator.crs_scale(p[index], k)
    if method == "wta_crs":
        top, c, rest_p = estimator.wta_plan(scores, p, k)
        if noise is None:
            drawn = torch.multinomial(rest_p, k, replacement=True, generator=generator)
        else:
            drawn = estimator.wta_draw(rest_p, noise.to(device).float())
        return estimator.wta_combine(p, top, c, rest_p, drawn)
    if method == "bernoulli":
        q = estimator.inclusion(p, k)
        u = torch.rand(n, device=device, generator=generator) if noise is None else noise.to(device)
        index = torch.nonzero(estimator.bernoulli_drawn(q, u)).squeeze(1)
        if index.numel() == 0:
            # Nothing drawn: the estimate is 0. One pair scaled by 0 keeps every shape
            # (a 0-channel convolution is not one) and gives zero gradients.
            return torch.argmax(q).view(1), torch.zeros(1, device=device)
        return index, 1.0 / q[index]
    raise ValueError(f"unknown sampling method {method!r}")
