"""What data-parallel ranks must agree on: weight-only sampling streams and the sampled indices.

With ``scores="weights"`` a sampled op scores its inner dimension from the weight alone.
DDP keeps the weights identical on every rank, so ``topk`` picks the same slices everywhere.
A random method must also draw the same random numbers everywhere: :func:`stream` gives
each weight its own ``torch.Generator``, seeded with the node's ``seed`` (from
``ApproxConfig.seed`` and the node name, fixed in the rewritten code) the first time the
weight is sampled. Every rank runs the same training steps, so the generators advance in
lockstep, and the user's global stream (data order, dropout) may differ across ranks freely.
A restarted job begins the streams anew from their seeds, again the same on every rank.
A forward pass without autograd (``torch.no_grad()``, e.g. a loss logged on rank 0 only
while the model is in ``train()`` mode) produces no gradient to all-reduce: it draws from
torch's global generator instead, records nothing, and leaves the shared streams where
they are, so one rank's extra forward cannot knock the ranks out of step.

The communication hook (``approxcompile.distributed``) needs the columns of each weight
sampled since its last all-reduce: a sampled op calls :func:`record` with the weight and
the indices it kept; the hook :func:`watch`-es the weights it compresses and
:func:`take`-s their indices (the union over every forward since the last take, which
covers gradient accumulation under ``no_sync()`` and weights used twice). Weights nobody
watches are not recorded, so single-process training pays one dictionary lookup.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

# Keyed by the weight tensor's identity, held weakly: a freed model leaves nothing behind.
_STREAMS = WeakIdKeyDictionary()
_WATCHED = WeakIdKeyDictionary()  # weight -> list of index tensors since the last take()


def stream(weight: Tensor, seed: int | None, enabled: bool | None = None) -> torch.Generator | None:
    """The generator of ``weight``'s sampling stream, created from ``seed`` on first use.

    ``None`` (torch's global generator) when there is no seed or autograd is off. The
    custom-op kernels run with autograd off, so they pass the caller's state as ``enabled``.
    """
    if enabled is None:
        enabled = torch.is_grad_enabled()
    if seed is None or not enabled:
        return None
    gen = _STREAMS.get(weight)
    if gen is None:
        gen = torch.Generator(device=weight.device).manual_seed(seed)
        _STREAMS[weight] = gen
    return gen


def reset_streams() -> None:
    """Forget every stream: the next sampled step starts each one again from its seed."""
    _STREAMS.clear()


def watch(weight: Tensor) -> None:
    """Start recording the indices sampled for ``weight``."""
    if weight not in _WATCHED:
        _WATCHED[weight] = []


def unwatch(weight: Tensor) -> None:
    _WATCHED.pop(weight, None)


def record(weight: Tensor, index: Tensor, enabled: bool | None = None) -> None:
    """Called by the sampled ops: ``weight``'s slices ``index`` (along its dim 1) were kept.

    ``enabled`` as for :func:`stream` (default: whether autograd is on).
    """
    if not _WATCHED:
        return  # no hook watches any weight (single-process training): nothing to look up
    if enabled is None:
        enabled = torch.is_grad_enabled()
    if not enabled:
        return  # no gradient will come of this forward
    seen = _WATCHED.get(weight)
    if seen is not None:
        seen.append(index.detach())


def take(weight: Tensor) -> Tensor | None:
    """Sorted unique indices recorded for ``weight`` since the last take, or ``None`` if none."""
    seen = _WATCHED.get(weight)
    if not seen:
        return None
    _WATCHED[weight] = []
    return torch.unique(torch.cat(seen)) if len(seen) > 1 else torch.unique(seen[0])
