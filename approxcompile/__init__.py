"""approxcompile: train PyTorch models with sampled matmuls and convolutions under a FLOP budget.

>>> import approxcompile
>>> fast = approxcompile.optimize(model, budget=0.4, example_inputs=(x,))
>>> print(approxcompile.report(fast))
"""

from approxcompile.api import optimize
from approxcompile.config import ApproxConfig, NodeOverride
from approxcompile.errors import (
    ApproxCompileError,
    BudgetError,
    ExampleInputError,
    TraceError,
    VerificationError,
)
from approxcompile.ops import sampled_addmm, sampled_conv, sampled_linear, sampled_matmul
from approxcompile.report import Report, report

__version__ = "0.1.0"

__all__ = [
    "ApproxCompileError",
    "ApproxConfig",
    "BudgetError",
    "ExampleInputError",
    "NodeOverride",
    "Report",
    "TraceError",
    "VerificationError",
    "optimize",
    "report",
    "sampled_addmm",
    "sampled_conv",
    "sampled_linear",
    "sampled_matmul",
]
