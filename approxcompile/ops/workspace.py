"""Scratch memory that the sampled kernels reuse from one training step to the next.

Why: a training step of a sampled layer allocates full-size buffers (the weight gradient,
the input gradient, the gathered weight columns). PyTorch's CPU allocator hands large
blocks back to the operating system when they are freed, so every step pays for fresh
pages: on the development machines, ``torch.zeros(4096, 4096)`` takes 19 ms on fresh
memory and 1.5 ms on memory touched before (docs/performance.md). A
:class:`Workspace` keeps one storage per (tensor, slot) alive and hands it out again once
nobody holds it any more.

Safety: a storage is reused only when the workspace holds its *only* reference, i.e. no
tensor or view made from it earlier is alive (a ``.grad`` still set, a saved activation,
a user's reference). Otherwise a fresh tensor is returned and the pooled one is left
alone. A tensor handed out is a new ``TensorImpl`` over the storage, so autograd may
steal it as a parameter's ``.grad`` without copying. Contents are undefined; callers
zero what they need. Entries die with the tensor they are keyed by (``weakref``).

>>> buf = WORKSPACE.get(weight, "grad", weight.shape, weight.dtype)  # reused next step
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary


def _use_count(storage: torch.UntypedStorage) -> int:
    return int(torch._C._storage_Use_Count(storage._cdata))


class Workspace:
    """Per-(owner tensor, slot) storages, reused when no one else holds them."""

    def __init__(self) -> None:
        self._slots: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.enabled = True

    def get(self, owner: Tensor, slot: str, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        """An uninitialised tensor of ``shape``; its memory is reused across calls when free."""
        if not self.enabled or owner.device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=owner.device)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        slots: dict[str, torch.UntypedStorage] = self._slots.setdefault(owner, {})
        storage = slots.get(slot)
        if storage is not None and _use_count(storage) > 1:
            return torch.empty(shape, dtype=dtype)  # still in use: leave it alone
        if storage is None or storage.nbytes() < nbytes:
            storage = torch.UntypedStorage(nbytes)
            slots[slot] = storage
        shape = tuple(shape)
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape, _contiguous_strides(shape))

    def zeros(self, owner: Tensor, slot: str, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        return self.get(owner, slot, shape, dtype).zero_()

    def nbytes(self) -> int:
        """Bytes held by the workspace right now (for memory accounting)."""
        return sum(s.nbytes() for slots in self._slots.values() for s in slots.values())

    def clear(self) -> None:
        """Drop every pooled storage (they are freed once no tensor uses them)."""
        self._slots = WeakIdKeyDictionary()


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


WORKSPACE = Workspace()
