"""Exclusions: which candidate nodes must stay exact, and the settings of the rest.

``apply_exclusions`` resolves each node's settings (overrides, QConfigMapping precedence)
and records why a node must stay exact: unsupported form, an override, first / last
candidate, inner dimension too small. It updates ``node.meta["approxcompile"]`` only; the
graph is unchanged.
"""

from __future__ import annotations

import torch.fx as fx

from approxcompile.config import ApproxConfig
from approxcompile.passes.base import ExclusionResult
from approxcompile.passes.match import site_of
from approxcompile.plan import META_KEY, NodePlan


def _planned(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if META_KEY in n.meta]


def apply_exclusions(gm: fx.GraphModule, config: ApproxConfig) -> ExclusionResult:
    """Resolve per-node settings and record a reason on every node that must stay exact."""
    nodes = _planned(gm)
    shaped = [n for n in nodes if n.meta[META_KEY].shapes]
    ends = {shaped[0].name: "first", shaped[-1].name: "last"} if shaped else {}
    excluded = 0
    for node in nodes:
        plan: NodePlan = node.meta[META_KEY]
        site = site_of(gm, node, plan)
        s = config.resolve(kind=plan.kind, names=(plan.name, site.owner) if site.owner else (plan.name,))
        reason = plan.reason
        at_end = config.exclude_first_last and node.name in ends
        if reason is None and s.exact:
            reason = f"left exact by override ({s.source})"
        elif reason is None and s.keep is s.row_keep is None and at_end:
            reason = f"{ends[node.name]} candidate node (kept exact, as in the paper)"
        elif reason is None and plan.inner < config.min_inner:
            reason = f"inner dimension {plan.inner} is too small to sample (min_inner={config.min_inner})"
        elif reason is None and plan.inner <= s.min_k:
            reason = f"inner dimension {plan.inner} is not above min_k={s.min_k}"
        fixed = row_fixed = None
        if reason is None and s.keep is not None:
            fixed = max(s.keep, s.min_k / plan.inner)
        if reason is None and s.row_keep is not None and plan.split:
            row_fixed = s.row_keep
        node.meta[META_KEY] = plan.with_(
            method=s.method,
            min_k=s.min_k,
            fixed_keep=fixed,
            row_fixed_keep=row_fixed,
            reason=reason,
            settings_source=s.source,
        )
        excluded += reason is not None
    return ExclusionResult(graph_module=gm, modified=False, excluded=excluded)
