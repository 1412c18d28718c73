"""Exceptions raised by approxcompile; each says which pass failed and what to do."""

from __future__ import annotations


class ApproxCompileError(Exception):
    """Base class of every error approxcompile raises on purpose."""


class BudgetError(ApproxCompileError, ValueError):
    """The requested budget cannot be met (or is not a fraction in (0, 1])."""


class TraceError(ApproxCompileError, RuntimeError):
    """torch.fx could not trace the model."""


class ExampleInputError(ApproxCompileError, RuntimeError):
    """The model failed when run on the example inputs."""


class VerificationError(ApproxCompileError, RuntimeError):
    """The rewritten graph is malformed or differs from the original in eval mode."""


class PlanError(ApproxCompileError, ValueError):
    """A saved plan does not fit the model it is applied to."""


class PlanWarning(UserWarning):
    """A legal plan that is probably not what was wanted (high error, budget eaten by exact nodes).

    Silence it with ``warnings.filterwarnings("ignore", category=approxcompile.PlanWarning)``.
    """
