"""Exceptions raised by approxcompile; each says which pass failed and what to do."""

from __future__ import annotations


class ApproxCompileError(Exception):
    """Base class of every error approxcompile raises on purpose."""


class BudgetError(ApproxCompileError, ValueError):
    """The requested budget cannot be met (or is not a fraction in (0, 1]).

    ``smallest_feasible``: the exact smallest budget the model admits, when that is the problem.
    """

    smallest_feasible: float | None = None

    @classmethod
    def infeasible(cls, smallest_feasible: float, message: str) -> BudgetError:
        err = cls(message)
        err.smallest_feasible = smallest_feasible
        return err


class TraceError(ApproxCompileError, RuntimeError):
    """torch.fx could not trace the model."""


class ExampleInputError(ApproxCompileError, RuntimeError):
    """The model failed when run on the example inputs."""


class VerificationError(ApproxCompileError, RuntimeError):
    """The rewritten graph is malformed or differs from the original in eval mode."""


class NonFiniteError(ApproxCompileError, ValueError):
    """A parameter, buffer or example input holds NaN or Inf."""


class DoubleBackwardError(ApproxCompileError, RuntimeError):
    """A sampled op was differentiated twice (``create_graph=True``)."""


class PlanError(ApproxCompileError, ValueError):
    """A saved plan does not fit the model it is applied to."""


class SaveError(ApproxCompileError, TypeError):
    """The module cannot be pickled or deep-copied (a model captured by the dynamo frontend)."""


class PlanWarning(UserWarning):
    """A legal plan that is probably not what was wanted (high error, budget eaten by exact nodes).

    Silence it with ``warnings.filterwarnings("ignore", category=approxcompile.PlanWarning)``.
    """
