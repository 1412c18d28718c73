"""Dense references for the sampled products: the kept pairs as a scale vector over every pair.

The library gathers the kept slices and scatters gradients back; these references multiply
the full operand by a length-n vector that holds each pair's total scale (0 for pairs not
kept, repeats of a ``crs`` draw added up) and run the exact op, so autograd gives the
gradients with no gather or scatter anywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from approxcompile.ops import sample_pairs


def norms(t: Tensor, dim: int) -> Tensor:
    """Euclidean norm of every slice of ``t`` along ``dim``, as a sum of squares."""
    others = [d for d in range(t.dim()) if d != dim % t.dim()]
    return t.detach().float().pow(2).sum(others).sqrt()


def pair_scale(n: int, index: Tensor, scale: Tensor | None) -> Tensor:
    """Length-n multiplier: ``sum of scale[j] over j with index[j] == i``; 1 per pick for topk."""
    each = torch.ones(index.numel()) if scale is None else scale.float()
    return torch.zeros(n).index_add_(0, index, each)


def linear(x: Tensor, w: Tensor, b: Tensor | None, k: int, method: str, seed: int) -> Tensor:
    """``sampled_linear`` with ``generator=manual_seed(seed)``, as one dense product."""
    n = w.shape[1]
    scores = norms(x.reshape(-1, n), 1) * norms(w, 1)
    index, scale = sample_pairs(scores, k, method, generator=torch.Generator().manual_seed(seed))
    return F.linear(x * pair_scale(n, index, scale).to(x.dtype), w, b)


def conv(x: Tensor, w: Tensor, b: Tensor | None, k: int, method: str, seed: int, *conv_args) -> Tensor:
    """``sampled_conv`` with ``generator=manual_seed(seed)``, as one dense convolution."""
    n = w.shape[1]
    index, scale = sample_pairs(
        norms(x, 1) * norms(w, 1), k, method, generator=torch.Generator().manual_seed(seed)
    )
    s = pair_scale(n, index, scale).to(x.dtype).view(1, n, *([1] * (x.dim() - 2)))
    return (F.conv1d, F.conv2d, F.conv3d)[w.dim() - 3](x * s, w, b, *conv_args)
