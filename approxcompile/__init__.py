"""approxcompile: train PyTorch models with sampled matmuls and convolutions under a FLOP budget.

>>> import approxcompile
>>> fast = approxcompile.optimize(model, budget=0.4, example_inputs=(x,))
>>> print(approxcompile.report(fast))
>>> approxcompile.export_training(fast, (x,), "artifacts")   # ONNX Runtime training (docs/export.md)
"""

from typing import Any

from approxcompile.api import optimize
from approxcompile.config import ApproxConfig, NodeOverride
from approxcompile.errors import (
    ApproxCompileError,
    BudgetError,
    DoubleBackwardError,
    ExampleInputError,
    NonFiniteError,
    PlanError,
    PlanWarning,
    TraceError,
    VerificationError,
)
from approxcompile.module import ApproxModule
from approxcompile.ops import sampled_addmm, sampled_conv, sampled_linear, sampled_matmul
from approxcompile.report import Report, report
from approxcompile.saving import SavedPlan, load_plan, save_plan
from approxcompile.schedule import set_budget

__version__ = "0.1.0"

# The export entry points load torch.onnx (and numpy) on first use only, so `import
# approxcompile` stays cheap and works without the optional [ort] extra.
_EXPORTS = ("export_onnx", "export_training", "OrtTrainer")


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import approxcompile.export as export

        return getattr(export, name)
    raise AttributeError(f"module 'approxcompile' has no attribute {name!r}")


__all__ = [
    "ApproxCompileError",
    "ApproxConfig",
    "ApproxModule",
    "BudgetError",
    "DoubleBackwardError",
    "ExampleInputError",
    "NodeOverride",
    "NonFiniteError",
    "OrtTrainer",
    "PlanError",
    "PlanWarning",
    "Report",
    "SavedPlan",
    "TraceError",
    "VerificationError",
    "export_onnx",
    "export_training",
    "load_plan",
    "optimize",
    "report",
    "sampled_addmm",
    "sampled_conv",
    "sampled_linear",
    "sampled_matmul",
    "save_plan",
    "set_budget",
]
