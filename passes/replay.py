"""Replay: take every node's decision from a saved plan instead of measuring and allocating.

``optimize(model, example_inputs=..., plan=saved)`` runs trace, shapes and cost as usual, then
this pass in place of exclusions, sensitivity, timing and selection:

    node "fc2" (cost annotated, undecided) -> node "fc2" with the saved keep, k, method, reason

The saved plan must describe the same graph: the same candidate nodes, by name, with the same
kind, inner dimension and operand shapes; anything else is a :class:`PlanError` naming the node.
The costs stay the ones measured now, so the report shows the plan's cost on this model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from approxcompile.errors import PlanError
from approxcompile.passes.base import PassResult
from approxcompile.plan import META_KEY, NodePlan, Plan

# The fields a plan decides; everything else (shapes, FLOPs, overheads) is measured again.
_DECIDED = (
    "method",
    "min_k",
    "fixed_keep",
    "row_fixed_keep",
    "keep",
    "row_keep",
    "k",
    "est_error",
    "reason",
    "settings_source",
    "sensitivity",
    "row_sensitivity",
    "timing",
)


@dataclass(frozen=True, kw_only=True)
class ReplayResult(PassResult):
    replayed: int  # nodes whose decision came from the saved plan
    sampled: int  # of them, the ones the plan samples


def _mismatch(now: NodePlan, saved: NodePlan) -> str | None:
    for field in ("kind", "inner", "shapes", "mode"):
        a, b = getattr(now, field), getattr(saved, field)
        if a != b:
            return f"{field} is {a!r} here but {b!r} in the saved plan"
    return None


def apply_plan(gm: fx.GraphModule, saved: Plan) -> ReplayResult:
    """Copy each candidate node's decision from ``saved`` (matched by name); graph unchanged."""
    nodes = [n for n in gm.graph.nodes if META_KEY in n.meta]
    by_name = {p.name: p for p in saved.nodes}
    here = {n.meta[META_KEY].name for n in nodes}
    missing, extra = sorted(set(by_name) - here), sorted(here - set(by_name))
    if missing or extra:
        raise PlanError(
            f"[replay] the saved plan does not fit this model: nodes only in the plan {missing}, "
            f"only in the model {extra}; save the plan from the same model architecture and "
            "example input shapes, or optimize without plan= to make a new one"
        )
    sampled = 0
    for node in nodes:
        now: NodePlan = node.meta[META_KEY]
        old = by_name[now.name]
        why = _mismatch(now, old)
        if why is not None:
            raise PlanError(
                f"[replay] node {now.name!r}: {why}; the plan was made for other example input shapes "
                "or another model. Use the example input shapes the plan was saved with, or optimize "
                "without plan= to make a new one"
            )
        node.meta[META_KEY] = now.with_(**{f: getattr(old, f) for f in _DECIDED})
        sampled += old.sampled
    return ReplayResult(graph_module=gm, modified=False, replayed=len(nodes), sampled=sampled)
