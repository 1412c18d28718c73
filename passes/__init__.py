"""Graph passes of approxcompile, in pipeline order.

capture (fx trace / torch.export / dynamo) -> propagate_shapes -> annotate_costs -> apply_exclusions
-> measure_sensitivity -> [measure_timing] -> allocate -> rewrite -> verify. Each takes a
``GraphModule`` and returns a :class:`PassResult` subclass with its typed results; only
``capture`` (new module) and ``rewrite`` (in place) change graphs.
"""

from approxcompile.passes.allocation import allocate
from approxcompile.passes.base import (
    AllocationResult,
    CostResult,
    ExclusionResult,
    PassResult,
    RewriteResult,
    SensitivityResult,
    ShapeResult,
    StepFlops,
    TimingResult,
    TraceResult,
    VerifyResult,
)
from approxcompile.passes.capture import CAPTURE_KEY, CaptureInfo, capture, unwrap
from approxcompile.passes.cost import annotate_costs, measure_other_flops, measure_step_flops
from approxcompile.passes.dynamo import plan_regions
from approxcompile.passes.exclusions import apply_exclusions
from approxcompile.passes.match import Site, match
from approxcompile.passes.rewrite import rewrite
from approxcompile.passes.sensitivity import measure_sensitivity
from approxcompile.passes.shapes import propagate_shapes
from approxcompile.passes.timing import measure_timing
from approxcompile.passes.trace import share_parameters, trace
from approxcompile.passes.verify import verify

__all__ = [
    "CAPTURE_KEY",
    "CaptureInfo",
    "AllocationResult",
    "CostResult",
    "ExclusionResult",
    "PassResult",
    "RewriteResult",
    "SensitivityResult",
    "ShapeResult",
    "Site",
    "StepFlops",
    "TimingResult",
    "TraceResult",
    "VerifyResult",
    "allocate",
    "annotate_costs",
    "apply_exclusions",
    "capture",
    "match",
    "measure_other_flops",
    "measure_sensitivity",
    "measure_step_flops",
    "measure_timing",
    "plan_regions",
    "propagate_shapes",
    "rewrite",
    "share_parameters",
    "trace",
    "unwrap",
    "verify",
]
