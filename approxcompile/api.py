"""``optimize``: the whole pipeline, one named step a line."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import time
import warnings
from typing import Any

import torch
import torch.fx as fx
from torch import nn

import approxcompile.passes as passes
from approxcompile import checks, guards
from approxcompile.config import ApproxConfig, check_method
from approxcompile.errors import BudgetError, PlanError, PlanWarning
from approxcompile.module import clone_inputs, finalize, isolate, planning_view
from approxcompile.plan import META_KEY, Plan
from approxcompile.progress import enabled as progress_enabled
from approxcompile.progress import logger
from approxcompile.saving import CONFIG_META_KEY, SavedPlan, load_plan


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
    budget: float | None = None,
    *,
    example_inputs: Any,
    method: str | None = None,
    config: ApproxConfig | None = None,
    plan: SavedPlan | dict[str, Any] | str | os.PathLike[str] | fx.GraphModule | None = None,
    progress: bool | None = None,
) -> fx.GraphModule:
    """Return ``model`` rewritten so one training step costs at most ``budget`` of its FLOPs.

    The result shares parameters and buffers with ``model`` (which is not mutated; see
    ``approxcompile.module``), has the same ``state_dict()`` keys and tensors, samples in
    ``train()`` mode and is exact in ``eval()``. ``example_inputs`` is a tuple of
    ``forward``'s positional inputs (or a dict of keyword inputs); it is not modified.
    ``budget`` defaults to 0.4. ``method`` overrides ``config.method``.
    ``approxcompile.report(result)`` shows what was sampled and why the rest was not.

    ``plan``: a plan saved with ``approxcompile.save_plan`` (a path, its dict, or a module
    ``optimize`` returned) to re-apply as it is: the same nodes at the same keep ratios with
    the same methods, without measuring again; its config and budget apply (``config`` and
    ``budget``, when given, must equal them). ``progress``: draw a progress bar on stderr
    while measuring (``None``: only on a terminal, for slow passes). Plans that look wrong
    (a node's error above 0.5, exact nodes eating the budget) raise a ``PlanWarning`` naming
    the fix.

    >>> fast = optimize(model, budget=0.4, example_inputs=(torch.randn(64, 784),))
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize() needs an nn.Module, got {type(model).__name__}")
    saved = load_plan(plan) if plan is not None else None
    if saved is not None:
        budget, config = _check_against_plan(saved, budget, method, config)
    budget = _check_budget(0.4 if budget is None else budget)
    if config is not None and not isinstance(config, ApproxConfig):
        raise TypeError(f"config must be an ApproxConfig, got {type(config).__name__}")
    config = config or ApproxConfig()
    if method is not None:
        config = dataclasses.replace(config, method=check_method(method))
    inputs = checks.example_inputs(model, example_inputs)
    checks.check_values(model, inputs)
    # Planning runs forward about four times; the global RNG stream stays as it was.
    with torch.random.fork_rng(devices=[]), progress_enabled(progress):
        gm = _plan(model, budget, inputs, config, saved)
    if gm.meta[passes.CAPTURE_KEY].frontend == "dynamo":
        return gm  # planned region by region as dynamo hands the regions over
    # A ModeGraphModule's eval graph (code reads self.training) comes along into the result.
    fast = finalize(gm, passes.unwrap(model))
    result: Plan = fast.meta[META_KEY]
    logger.info(
        "optimize: %d/%d nodes sampled, %.3f of the dense FLOPs, %.2fs",
        sum(n.sampled for n in result.nodes),
        len(result.nodes),
        result.fraction,
        time.perf_counter() - start,
    )
    for guard in guards.check(result):
        warnings.warn(str(guard), PlanWarning, stacklevel=2)
    return fast


def _check_against_plan(
    saved: SavedPlan, budget: float | None, method: str | None, config: ApproxConfig | None
) -> tuple[float, ApproxConfig]:
    """The saved plan's budget and config, after checking the caller asked for nothing else."""
    if budget is not None and budget != saved.plan.budget:
        raise PlanError(
            f"budget={budget!r} differs from the saved plan's budget {saved.plan.budget!r}; drop budget= "
            "to re-apply the plan, or drop plan= to make a new one"
        )
    if config is not None and config != saved.config:
        raise PlanError(
            f"config differs from the one the plan was saved with ({saved.config!r}); drop config= to "
            "re-apply the plan, or drop plan= to make a new one"
        )
    if method is not None and method != saved.config.method:
        raise PlanError(
            f"method={method!r} differs from the saved plan's {saved.config.method!r}; drop method="
        )
    return saved.plan.budget, saved.config


def _plan(
    model: nn.Module,
    budget: float,
    inputs: checks.ExampleInputs,
    config: ApproxConfig,
    saved: SavedPlan | None = None,
) -> fx.GraphModule:
    """The planned and rewritten graph, over a copy of ``model`` (no hooks, cloned buffers)."""
    concrete = dict.fromkeys(inputs.fixed_none)
    # capture: a GraphModule over new module objects that share the user's tensors (fx / export / dynamo)
    front = passes.capture(
        model,
        clone_inputs(inputs.args),
        frontend=config.frontend,
        leaf_modules=config.leaf_modules,
        concrete_args=concrete,
    )
    gm, model = front.graph_module, front.model  # model: behind torch.compile / optimize
    if front.frontend == "dynamo":  # data-dependent control flow: planned region by region
        passes.plan_regions(gm, clone_inputs(inputs.args), budget=budget, config=config)
        return gm
    isolate(gm)  # every forward below writes cloned buffers and fresh input copies only
    example = inputs.positional(gm)
    # shapes: every node's shape / requires_grad, and the operands of each product
    captured = passes.propagate_shapes(gm, clone_inputs(example)).captured
    # cost: dense forward / input-grad / weight-grad FLOPs and sampling overhead per node
    passes.annotate_costs(gm, method=config.method, mode=config.mode, attention=config.attention)
    if saved is not None:
        # replay: every node's decision from the saved plan, nothing measured again
        other_flops = saved.plan.other_flops
        passes.apply_plan(gm, saved.plan)
    else:
        other_flops = passes.measure_other_flops(gm, clone_inputs(example)).other
        # exclusions: overrides, first/last node, unsupported forms, small inner dimensions
        passes.apply_exclusions(gm, config)
        checks.warn_unmatched_overrides(config, _candidate_names(gm), (n for n, _ in model.named_modules()))
        # sensitivity: measured output error of each node at each keep ratio
        passes.measure_sensitivity(gm, captured, config)
        if config.measure_time:
            # timing: measured seconds per keep ratio, so no sampled node is slower than exact
            passes.measure_timing(gm, captured, config)
        # selection: keep ratios minimising the summed error within the budget
        passes.allocate(gm, budget=budget, other_flops=other_flops)
    del captured
    # rewrite: sampled nodes become calls to approxcompile.ops
    passes.rewrite(gm, config, hooked=checks.hooked_modules(model))
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
        frontend=front.frontend,
        frontend_reason=front.reason,
    )
    gm.meta[CONFIG_META_KEY] = config  # for save_plan
    return gm
