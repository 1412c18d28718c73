"""What every pass returns: the module it produced, whether the graph changed, and typed facts.

Each pass returns its own subclass of :class:`PassResult` whose extra fields are its results
(``propagate_shapes(...).captured``, ``allocate(...).fraction``, ...), so callers read
attributes mypy checks rather than string keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn


@dataclass(frozen=True, kw_only=True)
class PassResult:
    """The module a pass produced and whether it changed the graph."""

    graph_module: fx.GraphModule
    modified: bool

    @property
    def stats(self) -> Mapping[str, Any]:
        """The pass's own fields by name, for logging (read the attributes in code)."""
        base = {f.name for f in dataclasses.fields(PassResult)}
        fields = (f for f in dataclasses.fields(self) if f.name not in base)
        # Modules (the captured model) would print their whole repr into a log line.
        return {f.name: v for f in fields if not isinstance(v := getattr(self, f.name), nn.Module)}


@dataclass(frozen=True, kw_only=True)
class TraceResult(PassResult):
    nodes: int  # nodes in the traced graph


@dataclass(frozen=True, kw_only=True)
class ShapeResult(PassResult):
    # node name -> the tensors behind its Site operands (the kind's sampled op takes them in
    # this order), recorded on the example inputs for the sensitivity and timing passes
    captured: Mapping[str, tuple[Any, ...]]


@dataclass(frozen=True, kw_only=True)
class CostResult(PassResult):
    candidates: int  # nodes that got a NodePlan


@dataclass(frozen=True, kw_only=True)
class ExclusionResult(PassResult):
    excluded: int  # nodes given a reason to stay exact


@dataclass(frozen=True, kw_only=True)
class SensitivityResult(PassResult):
    measured: int  # nodes whose error curve was measured


@dataclass(frozen=True, kw_only=True)
class TimingResult(PassResult):
    timed: int  # nodes whose step time was measured


@dataclass(frozen=True, kw_only=True)
class AllocationResult(PassResult):
    sampled: int  # nodes the plan samples
    fraction: float  # planned training FLOPs / dense, overhead included


@dataclass(frozen=True, kw_only=True)
class RewriteResult(PassResult):
    replaced: int  # nodes replaced by a sampled op


@dataclass(frozen=True, kw_only=True)
class VerifyResult(PassResult):
    outputs: int  # output tensors compared


@dataclass(frozen=True, kw_only=True)
class StepFlops:
    """What ``measure_other_flops`` counted in one dense training step.

    ``step``: FLOPs ``FlopCounterMode`` counts in a forward + backward (0 when it could not
    count); ``matched``: the dense FLOPs of the planned nodes; ``other``: the rest, never below 0
    (e.g. ``scaled_dot_product_attention``), which the budget's denominator adds to the nodes'.
    """

    step: int
    matched: int
    counted: bool  # False when FlopCounterMode failed and ``other`` is taken as 0

    @property
    def other(self) -> int:
        return max(0, self.step - self.matched) if self.counted else 0
