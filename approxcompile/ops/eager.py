"""When a custom op's kernel may be called directly instead of through the dispatcher.

Why: the ``torch.library`` custom ops (the draw, the sampled linear and conv products and
their backward ops) exist so that compiled graphs, fake tensors and flop counters see one
opaque op. A plain eager call pays for that too: on the development CPU (1 thread) the
dispatcher's Python custom-op path costs about 45 us per draw and 90 us per linear backward,
and the products' generated autograd wrappers more, against a 3.4 ms step of the MNIST MLP
(batch 50, 500-wide layers), whose sampled step is no faster than exact because of such
fixed costs. A direct call runs the same kernel (the forward products through a plain
``autograd.Function``, ``kernels.linear_product``), so the results are the same.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def direct(*tensors: Tensor | None) -> bool:
    """True for a plain eager call: nothing traces, no dispatch mode, no tensor subclass.

    Tracing (``torch.compile``, export), fake tensors, functionalization, ``make_fx`` and
    ``FlopCounterMode`` all show up as one of these, and then the op must be called.
    """
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)
