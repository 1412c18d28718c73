"""Runtime sampled operations that rewritten graphs call."""

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
)

# Rewritten graphs' code names them approxcompile_ops_sampled_linear(...), and pickled
# GraphModules import them from here.
for _op in SAMPLED_OPS:
    _op.__module__ = __name__

__all__ = [
    "SAMPLED_OPS",
    "backward_sampled_conv",
    "backward_sampled_linear",
    "sample_pairs",
    "sampled_addmm",
    "sampled_baddbmm",
    "sampled_conv",
    "sampled_linear",
    "sampled_matmul",
]
