"""Autocast and the sampled ops' own autograd Functions, and what their backward refuses.

``torch.autocast`` does not see inside an ``autograd.Function``: the forward ran on
lower-precision copies of some operands and the backward would mix a lower-precision
``dY`` with full-precision saved weights. The sampled ops therefore apply autocast's
own rule before calling a Function: every floating operand except float64 is cast to
the autocast dtype (CPU bfloat16, CUDA float16, or whatever ``torch.autocast`` was
given), the cast being an ordinary autograd op, so gradients return to each
parameter in its own dtype. The Function then runs with autocast off.
"""

from __future__ import annotations

import torch
from torch import Tensor

from approxcompile.errors import DoubleBackwardError


def autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The dtype autocast would run a matmul / conv on ``t``'s device in, or ``None`` when it is off."""
    device = t.device.type
    if device not in ("cpu", "cuda", "xpu", "mps") or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def cast(dtype: torch.dtype, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Autocast's eligibility rule: floating tensors other than float64 go to ``dtype``."""
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )


def refuse_double_backward(op: str) -> None:
    """Called at the top of a sampled Function's backward."""
    if torch.is_grad_enabled():
        raise DoubleBackwardError(
            f"approxcompile: {op} does not support double backward (create_graph=True): its backward "
            "keeps only the sampled slices, not the graph of its inputs. Leave the layers you "
            "differentiate twice exact (ApproxConfig().set_module_name(name, NodeOverride(exact=True))) "
            "or take higher-order gradients in eval() mode, where every op is exact"
        )
