"""Corrections to ``FlopCounterMode``'s formulas, passed to it as ``custom_mapping``.

torch's formula for ``aten.convolution_backward`` ignores ``groups``: it counts the weight
gradient of a grouped convolution as if every output channel read every input channel, ``groups``
times too much (for a depthwise 3x3 over 128 channels that is 128x, measured: 38% of a small
MobileNet's counted step came from one such layer). The budget is a fraction of the counted
step, so the excess would show up as FLOPs no plan can remove.

It also has no formula for the CPU flash-attention kernel that ``scaled_dot_product_attention``
runs without dropout (in eval mode, where the cost pass counts): attention would count as 0 there
and as two batched products in a training step with dropout, which put a transformer's measured
step at 0.54 of dense for a plan at 0.49. The two formulas below count it as the math path does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import conv_backward_flop, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def grouped_conv_backward_flop(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """``conv_backward_flop`` with the weight-gradient part divided by ``groups``."""
    formula: Any = conv_backward_flop  # registered shape-wrapped: it takes the output as out_val
    total = int(formula(*args, out_val=out_shape, **kwargs))
    groups, mask = args[9], args[10]
    if groups > 1 and mask[1]:
        weight_grad = int(formula(*args[:10], [False, True, False], *args[11:], out_val=out_shape, **kwargs))
        total -= weight_grad - weight_grad // groups
    return total


def cpu_attention_flop(
    query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    """Forward of ``_scaled_dot_product_flash_attention_for_cpu``: the two batched products."""
    return int(sdpa_flop_count(query, key, value))


def cpu_attention_backward_flop(
    grad: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    """Its backward: the four batched products of the gradients."""
    return int(sdpa_backward_flop_count(grad, query, key, value))


FLOP_FIXES = {
    aten.convolution_backward: grouped_conv_backward_flop,
    aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flop,
}
