"""Graph passes of approxcompile, in pipeline order.

capture (fx trace / torch.export / dynamo) -> propagate_shapes -> annotate_costs -> apply_exclusions
-> measure_sensitivity -> [measure_timing] -> allocate -> rewrite -> verify; with a saved plan,
``apply_plan`` replaces apply_exclusions ... allocate. Each takes a ``GraphModule`` and returns a
:class:`PassResult` subclass with its typed results; only ``capture`` (new module) and ``rewrite``
(in place) change graphs.
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
from approxcompile.passes.replay import apply_plan
from approxcompile.passes.rewrite import rewrite
from approxcompile.passes.sensitivity import measure_sensitivity
from approxcompile.passes.shapes import propagate_shapes
from approxcompile.passes.timing import measure_timing
from approxcompile.passes.trace import share_parameters, trace
from approxcompile.passes.verify import verify
from approxcompile.progress import logged

# Each pass as optimize() calls it logs its name, time and statistics on the "approxcompile"
# logger; the modules keep the unwrapped functions.
trace = logged("trace", trace)
capture = logged("capture", capture)
propagate_shapes = logged("shapes", propagate_shapes)
annotate_costs = logged("cost", annotate_costs)
measure_other_flops = logged("other-flops", measure_other_flops)
apply_exclusions = logged("exclusions", apply_exclusions)
measure_sensitivity = logged("sensitivity", measure_sensitivity)
measure_timing = logged("timing", measure_timing)
allocate = logged("selection", allocate)
apply_plan = logged("replay", apply_plan)
rewrite = logged("rewrite", rewrite)
verify = logged("verify", verify)

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
    "apply_plan",
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
