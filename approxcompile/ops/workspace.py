"""Scratch memory that the sampled kernels reuse from one training step to the next.

Why: a training step of a sampled layer allocates full-size buffers (the weight gradient,
the input gradient). PyTorch's CPU allocator hands large blocks back to the operating
system when they are freed, so every step pays for fresh pages: on the development
machines, ``torch.zeros(4096, 4096)`` takes 19 ms on fresh memory and 1.5 ms on memory
touched before (docs/performance.md). A :class:`Workspace`
keeps a small pool of storages per (device, slot) alive and hands one out again once
nobody holds it any more.

The pool is keyed by slot name, not by the tensor a buffer belongs to: the sampled ops are
``torch.library`` custom ops, and inside a compiled graph their kernels see aliases of the
parameters, not the parameters themselves, so tensor identity is no key. A model with two
sampled layers of one shape holds two storages of the slot ``"grad"``, one per gradient
alive at the same time.

Safety: a storage is reused only when the workspace holds its *only* reference, i.e. no
tensor or view made from it earlier is alive (a ``.grad`` still set, a saved activation,
a user's reference). Otherwise another storage is used. A tensor handed out is a new
``TensorImpl`` over the storage, so autograd may steal it as a parameter's ``.grad``
without copying. Contents are undefined; callers zero what they need.

Only CPU memory is pooled: CUDA's caching allocator already reuses freed blocks (and
orders reuse with its streams), so elsewhere :meth:`Workspace.get` is ``torch.empty``.

>>> buf = WORKSPACE.get("grad", weight.shape, weight.dtype, weight.device)  # reused next step
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

MAX_PER_SLOT = 16  # storages kept per slot; more buffers alive at once are allocated fresh


def _use_count(storage: torch.UntypedStorage) -> int:
    return int(torch._C._storage_Use_Count(storage._cdata))


class Workspace:
    """Pools of CPU storages per slot name, each reused when no one else holds it."""

    def __init__(self) -> None:
        self._slots: dict[str, list[torch.UntypedStorage]] = {}
        self.enabled = True

    def get(self, slot: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised tensor of ``shape``; its memory is reused across calls when free."""
        if not self.enabled or _device_type(device) != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        nbytes = math.prod(shape) * dtype.itemsize
        pool = self._slots.setdefault(slot, [])
        free = [s for s in pool if _use_count(s) == 1]
        fits = [s for s in free if s.nbytes() >= nbytes]
        if fits:
            storage = min(fits, key=lambda s: s.nbytes())  # best fit: big buffers stay for big requests
        else:
            storage = torch.UntypedStorage(nbytes)
            if len(pool) >= MAX_PER_SLOT:
                if not free:
                    return torch.empty(shape, dtype=dtype)  # everything is in use: do not grow
                pool.remove(min(free, key=lambda s: s.nbytes()))  # too small for today's shapes
            pool.append(storage)
        shape = tuple(shape)
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape, _contiguous_strides(shape))

    def borrow(
        self, slot: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device
    ) -> Tensor | None:
        """Like :meth:`get`, but only from a storage already pooled and free; ``None`` otherwise.

        For scratch that is dead before the slot's own next use (the gathered weight columns
        of a sampled forward live in a free weight-gradient buffer): it never grows the pool.
        """
        if not self.enabled or _device_type(device) != "cpu":
            return None
        nbytes = math.prod(shape) * dtype.itemsize
        fits = [s for s in self._slots.get(slot, []) if _use_count(s) == 1 and s.nbytes() >= nbytes]
        if not fits:
            return None
        shape = tuple(shape)
        storage = min(fits, key=lambda s: s.nbytes())
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape, _contiguous_strides(shape))

    def zeros(self, slot: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        return self.get(slot, shape, dtype, device).zero_()

    def nbytes(self) -> int:
        """Bytes held by the workspace right now (for memory accounting)."""
        return sum(s.nbytes() for pool in self._slots.values() for s in pool)

    def clear(self) -> None:
        """Drop every pooled storage (they are freed once no tensor uses them)."""
        self._slots = {}


def _device_type(device: torch.device | str) -> str:
    return device.type if isinstance(device, torch.device) else torch.device(device).type


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


WORKSPACE = Workspace()
