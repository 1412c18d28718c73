"""Runtime sampled operations that rewritten graphs call."""

from approxcompile.ops import flops as _flops  # noqa: F401  (registers FlopCounterMode formulas)
from approxcompile.ops.attention import backward_sampled_attention, backward_sampled_matmul, sampled_attention
from approxcompile.ops.backward import backward_sampled_conv, backward_sampled_linear
from approxcompile.ops.sampled import (
    sampled_addmm,
    sampled_baddbmm,
    sampled_conv,
    sampled_linear,
    sampled_matmul,
)
from approxcompile.ops.sampling import sample_pairs

SAMPLED_OPS = (
    sampled_linear,
    sampled_matmul,
    sampled_addmm,
    sampled_baddbmm,
    sampled_conv,
    backward_sampled_linear,
    backward_sampled_conv,
    sampled_attention,
    backward_sampled_matmul,
    backward_sampled_attention,
)

# Rewritten graphs' code names them approxcompile_ops_sampled_linear(...), and pickled
# GraphModules import them from here.
for _op in SAMPLED_OPS:
    _op.__module__ = __name__

__all__ = [
    "SAMPLED_OPS",
    "backward_sampled_attention",
    "backward_sampled_matmul",
    "sampled_attention",
    "backward_sampled_conv",
    "backward_sampled_linear",
    "sample_pairs",
    "sampled_addmm",
    "sampled_baddbmm",
    "sampled_conv",
    "sampled_linear",
    "sampled_matmul",
]
