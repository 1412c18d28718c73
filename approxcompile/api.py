"""``optimize``: the whole pipeline, one named step a line."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import torch
import torch.fx as fx
from torch import nn

import approxcompile.passes as passes
from approxcompile import checks
from approxcompile.config import ApproxConfig, check_method
from approxcompile.errors import BudgetError
from approxcompile.module import ApproxModule, clone_inputs, finalize, isolate, planning_view
from approxcompile.plan import META_KEY, Plan


def _check_budget(budget: float) -> float:
    # numbers.Real admits numpy floats (np.float32(0.4)); bool is an int but never a budget.
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise BudgetError(f"budget must be a number in (0, 1], got {budget!r}")
    budget = float(budget)
    if math.isnan(budget) or not 0.0 < budget <= 1.0:
        raise BudgetError(
            f"budget must be in (0, 1] (the fraction of the dense training FLOPs to spend), got {budget!r}"
        )
    return budget


def _candidate_names(gm: fx.GraphModule) -> set[str]:
    """What module-name overrides are matched against: node names and their owning modules."""
    names: set[str] = set()
    for node in gm.graph.nodes:
        if META_KEY in node.meta:
            site = passes.match(gm, node)
            names |= {node.meta[META_KEY].name, *([site.owner] if site is not None and site.owner else [])}
    return names


def optimize(
    model: nn.Module,
    budget: float = 0.4,
    *,
    example_inputs: Any,
    method: str | None = None,
    config: ApproxConfig | None = None,
) -> ApproxModule:
    """Return ``model`` rewritten so one training step costs at most ``budget`` of its FLOPs.

    The result shares parameters and buffers with ``model`` (which is not mutated; see
    ``approxcompile.module``), has the same ``state_dict()`` keys and tensors, samples in
    ``train()`` mode and is exact in ``eval()``. ``example_inputs`` is a tuple of
    ``forward``'s positional inputs (or a dict of keyword inputs); it is not modified.
    ``method`` overrides ``config.method``. ``approxcompile.report(result)`` shows what
    was sampled and why the rest was not.

    >>> fast = optimize(model, budget=0.4, example_inputs=(torch.randn(64, 784),))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize() needs an nn.Module, got {type(model).__name__}")
    budget = _check_budget(budget)
    if config is not None and not isinstance(config, ApproxConfig):
        raise TypeError(f"config must be an ApproxConfig, got {type(config).__name__}")
    config = config or ApproxConfig()
    if method is not None:
        config = dataclasses.replace(config, method=check_method(method))
    inputs = checks.example_inputs(model, example_inputs)
    checks.check_values(model, inputs)
    # Planning runs forward about four times; the global RNG stream stays as it was.
    with torch.random.fork_rng(devices=[]):
        gm = _plan(model, budget, inputs, config)
    return finalize(gm, model)


def _plan(
    model: nn.Module, budget: float, inputs: checks.ExampleInputs, config: ApproxConfig
) -> fx.GraphModule:
    """The planned and rewritten graph, over a copy of ``model`` (no hooks, cloned buffers)."""
    concrete = dict.fromkeys(inputs.fixed_none)
    # trace: a GraphModule over new module objects that share the user's tensors
    gm = passes.trace(model, leaf_modules=config.leaf_modules, concrete_args=concrete).graph_module
    isolate(gm)  # every forward below writes cloned buffers and fresh input copies only
    example = inputs.positional(gm)
    # shapes: every node's shape / requires_grad, and the operands of each product
    captured = passes.propagate_shapes(gm, clone_inputs(example)).captured
    # cost: dense forward / input-grad / weight-grad FLOPs and sampling overhead per node
    passes.annotate_costs(gm, method=config.method, mode=config.mode)
    other_flops = passes.measure_other_flops(gm, clone_inputs(example)).other
    # exclusions: overrides, first/last node, unsupported forms, small inner dimensions
    passes.apply_exclusions(gm, config)
    checks.warn_unmatched_overrides(config, _candidate_names(gm), (n for n, _ in model.named_modules()))
    # sensitivity: measured output error of each node at each keep ratio
    passes.measure_sensitivity(gm, captured, config)
    if config.measure_time:
        # timing: measured seconds per keep ratio, so no sampled node is slower than exact
        passes.measure_timing(gm, captured, config)
    del captured
    # selection: keep ratios minimising the summed error within the budget
    passes.allocate(gm, budget=budget, other_flops=other_flops)
    # rewrite: sampled nodes become calls to approxcompile.ops
    passes.rewrite(gm, config)
    checks.warn_hooks_on_sampled(model, (n.meta[META_KEY] for n in gm.graph.nodes if META_KEY in n.meta))
    # verify: well-formed graph, eval outputs equal the original's
    original = planning_view(model)
    passes.verify(
        gm, original, clone_inputs(example), original_inputs=clone_inputs((inputs.args, dict(inputs.kwargs)))
    )

    nodes = tuple(n.meta[META_KEY] for n in gm.graph.nodes if META_KEY in n.meta)
    note = None if nodes else "no matmul / linear / conv nodes found: the model is returned unchanged"
    gm.meta[META_KEY] = Plan(
        budget=budget,
        method=config.method,
        nodes=nodes,
        other_flops=other_flops,
        note=note,
        mode=config.mode,
        scores=config.scores,
    )
    return gm
