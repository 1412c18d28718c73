"""Which column-row pairs to keep, and how to rescale them.

Every sampled product is ``sum_i A[:, i] B[i, :]`` restricted to the pairs this module
picks, each multiplied by its scale. Scores ``a_i = |A[:, i]| * |B[i, :]|`` come from the
caller; the four methods (design.md) are:

- ``topk``: the k largest scores, no scaling (deterministic, biased);
- ``crs``: k draws with replacement from ``p = (1-eps) a/sum(a) + eps/n``, scale ``1/(k p_i)``;
- ``bernoulli``: pair i kept with ``p_i = min(1, k q_i)``, ``q`` as for crs, scale ``1/p_i``;
- ``uniform``: k pairs uniformly without replacement, scale ``n/k``.

Indices come back sorted so gathers read memory in order. Randomness uses torch's
generator (``torch.manual_seed``) unless one is passed.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_EPS = 0.1


def _probabilities(scores: Tensor, eps: float) -> Tensor:
    """``(1-eps)·a/sum(a) + eps/n``; uniform when the scores carry no information."""
    n = scores.numel()
    a = torch.nan_to_num(scores.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_min_(0.0)
    total = a.sum()
    # Dead ReLUs or zero weights give all-zero scores: fall back to uniform, never 0/0.
    if not bool(torch.isfinite(total)) or float(total) <= 0.0:
        return torch.full_like(a, 1.0 / n)
    return a.div_(total).mul_(1.0 - eps).add_(eps / n)


def sample_pairs(
    scores: Tensor,
    k: int,
    method: str,
    *,
    eps: float = DEFAULT_EPS,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Pick pairs from ``scores`` (shape ``(n,)``): returns ``(index, scale)``.

    ``index`` is a sorted int64 vector (``crs`` may repeat an index, ``bernoulli`` returns a
    random count with expectation at most k); ``scale`` is ``None`` for ``topk``, else a
    float32 vector of the same length as ``index``.
    """
    n = scores.numel()
    device = scores.device
    if method == "topk":
        clean = torch.nan_to_num(scores.float(), nan=0.0, posinf=torch.finfo(torch.float32).max)
        index = torch.topk(clean, k, sorted=False).indices
        return torch.sort(index).values, None
    if method == "uniform":
        index = torch.randperm(n, device=device, generator=generator)[:k]
        index = torch.sort(index).values
        return index, torch.full((k,), n / k, device=device)
    p = _probabilities(scores, eps)
    if method == "crs":
        index = torch.sort(torch.multinomial(p, k, replacement=True, generator=generator)).values
        return index, 1.0 / (k * p[index])
    if method == "bernoulli":
        keep_p = (p * k).clamp_(max=1.0)
        u = torch.rand(n, device=device, generator=generator)
        index = torch.nonzero(u < keep_p).squeeze(1)
        if index.numel() == 0:
            # Nothing drawn: the estimate is 0. One pair scaled by 0 keeps every shape
            # (a 0-channel convolution is not one) and gives zero gradients.
            return torch.argmax(keep_p).view(1), torch.zeros(1, device=device)
        return index, 1.0 / keep_p[index]
    raise ValueError(f"unknown sampling method {method!r}")
