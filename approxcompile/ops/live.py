"""Which output channels of a gradient are not all zero ("live"): of a convolution's or a linear's.

Behind a sampled convolution (through ReLU and pooling, which act channel by channel) only
the channels it kept receive a gradient, so the layer before it sees an output gradient
that is exactly zero on most channels. That layer's backward can then run its products
over the live channels alone (``kernels.sampled_conv_product_backward``): the weight
gradient rows and bias entries of a dead channel are zero, and it adds nothing to the
input gradient.

Linears alike: behind a forward-sampled linear (through an elementwise activation) only
the input columns it kept receive a gradient, so the linear before it sees an output
gradient that is zero on most columns (``kernels.sampled_linear_product_backward``).
"""

from __future__ import annotations

import torch
from torch import Tensor

LIVE_MAX = 0.75  # slice the products only when at most this fraction of output channels is live
HEAD_ROWS = 32  # rows of a linear's gradient looked at first, to give up early on a dense one


def live_channels(dy: Tensor) -> Tensor | None:
    """Indices of the channels (dim 1) of ``dy`` with a nonzero entry; ``None`` when most are live.

    Exact: a channel counts as dead only when its maximum and minimum are both zero (a norm
    would underflow for values below ~1e-23; a NaN compares unequal to zero and stays live).
    The first sample is checked alone first: when it has every channel live, so does the
    batch, and a dense gradient costs a read of 1/N of it. Layouts other than contiguous and
    4-D channels-last return ``None`` (a copy to find out would cost more than it saves).
    """
    n, c = dy.shape[0], dy.shape[1]
    if dy.dim() < 3 or n == 0 or c < 4:
        return None
    if dy.dim() == 4 and not dy.is_contiguous() and dy.is_contiguous(memory_format=torch.channels_last):
        rows = dy.permute(0, 2, 3, 1).reshape(n, -1, c)  # rows of c channels: reduce over rows
        if bool(_nonzero_cols(rows[0]).all()):
            return None
        live = _nonzero_cols(rows.reshape(-1, c))
    elif dy.is_contiguous():  # runs of one channel: reduce each run
        if bool(_nonzero_rows(dy[0].reshape(c, -1)).all()):
            return None
        live = _nonzero_rows(dy.reshape(n * c, -1)).view(n, c).any(0)
    else:
        return None
    index = live.nonzero().squeeze(1)
    return index if index.numel() <= LIVE_MAX * c else None


def live_columns(dy: Tensor) -> Tensor | None:
    """Indices of the columns of a 2-D ``dy`` with a nonzero entry; ``None`` when most are live.

    Exact like :func:`live_channels` (NaN and values whose squares underflow stay live). A
    row of a linear's gradient is often sparse even when every column is live somewhere
    (behind a dense ReLU layer about half its entries are zero), so the first rows are
    checked first: once more than ``LIVE_MAX`` of the columns are live in them, the whole
    gradient has them too, and a dense gradient costs a read of ``HEAD_ROWS`` rows.
    """
    if dy.dim() != 2 or dy.shape[0] == 0 or dy.shape[1] < 4:
        return None
    m, p = dy.shape
    head = min(m, HEAD_ROWS)
    live = _nonzero_cols(dy[:head])
    if int(live.sum()) > LIVE_MAX * p:
        return None
    if head < m:
        live |= _nonzero_cols(dy[head:])
    index = live.nonzero().squeeze(1)
    return index if index.numel() <= LIVE_MAX * p else None


def _nonzero_cols(t: Tensor) -> Tensor:
    """``t[:, j]`` has a nonzero entry, for each column of a 2-D ``t``."""
    return (t.amax(0) != 0) | (t.amin(0) != 0)


def _nonzero_rows(t: Tensor) -> Tensor:
    """``t[r]`` has a nonzero entry, for each row of a 2-D ``t`` (contiguous rows: vectorised)."""
    return (t.amax(1) != 0) | (t.amin(1) != 0)
