"""Changing the budget during training: ``set_budget``, named schedules and an adaptive budget.

``set_budget(fast, b)`` re-runs only the selection over what ``optimize`` already measured
(every node's cost and ``(keep, error)`` curve, stored in ``node.meta["approxcompile"]``)
and writes the new keep ratios into the live module::

    sampled_linear(x, w, b, keep=0.35, ...)  -> sampled_linear(x, w, b, keep=0.6, ...)   (same node)
    fc2(x)  [exact, measured]                -> sampled_linear(x, w, b, keep=1.0, ...)   (first call)

Nothing is traced or measured again. The first call turns every measured exact node into a
``keep=1.0`` call (exact at run time); from then on a switch edits one keyword argument per
node and regenerates the module's code, so the graph's nodes stay the same objects. The
selection is deterministic, so every data-parallel rank computes the same plan (and the
same ``approxcompile.distributed.plan_fingerprint``) from the same stored measurements.

Schedules map a step to a budget; :class:`Scheduler` calls ``set_budget`` only when it changes::

    sched = approxcompile.schedule.Scheduler(fast, "anneal_to_exact", total_steps=1000, budget=0.2)
    for x, y in batches:
        sched.step()          # before the step: this step's budget
        ...

:class:`Adaptive` goes further: every ``every`` steps it measures each node's error curve again on
the current batch with the live weights and picks the smallest budget, at most ``budget``, whose
plan keeps the mean relative error of the measured nodes under ``target``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn

from approxcompile import kinds, ops
from approxcompile.api import _check_budget
from approxcompile.config import ApproxConfig
from approxcompile.errors import BudgetError, PlanError
from approxcompile.passes.allocation import allocate
from approxcompile.passes.exported import ModeGraphModule
from approxcompile.passes.rewrite import refresh_live, rewrite
from approxcompile.passes.sensitivity import node_curve
from approxcompile.plan import META_KEY, NodePlan, Plan
from approxcompile.saving import CONFIG_META_KEY

__all__ = ["SCHEDULES", "Adaptive", "Scheduler", "budget_at", "mean_error", "set_budget"]


def _live(fast: nn.Module) -> fx.GraphModule:
    """The planned GraphModule behind ``fast`` (a DDP wrapper is looked through)."""
    gm: Any = fast if isinstance(fast, fx.GraphModule) else getattr(fast, "module", fast)
    plan = gm.meta.get(META_KEY) if isinstance(gm, fx.GraphModule) else None
    if not isinstance(gm, fx.GraphModule) or not isinstance(plan, Plan):
        raise PlanError(
            f"[set_budget] needs a module approxcompile.optimize() returned, got a {type(fast).__name__} "
            "without an approxcompile plan"
        )
    if isinstance(gm, ModeGraphModule) or plan.frontend == "dynamo":
        raise PlanError(
            f"[set_budget] this module was captured with the {plan.frontend} frontend and runs more than "
            "one graph (train / eval, or regions); set_budget re-plans single-graph modules only: "
            "call optimize() again with the new budget"
        )
    if CONFIG_META_KEY not in gm.meta:
        raise PlanError("[set_budget] the module lost the config optimize() planned it with")
    return gm


def _planned(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if META_KEY in n.meta]


def _undecided(plan: NodePlan) -> NodePlan:
    """``plan`` as the selection first saw it.

    A node with a measured curve was eligible then (exclusions run before the measurement),
    so any reason it carries now is one the selection gave it; clear it.
    """
    if not plan.sensitivity:
        return plan
    row = {"row_keep": 1.0} if plan.split else {}
    return plan.with_(keep=1.0, k=plan.inner, est_error=0.0, reason=None, **row)


def _select(gm: fx.GraphModule, budget: float) -> Plan:
    """Select keep ratios for ``budget`` over the stored curves into the nodes' records only.

    The graph still runs the previous ratios until :func:`_apply` writes them; an infeasible
    budget leaves every record as it was.
    """
    nodes = _planned(gm)
    before = {n: n.meta[META_KEY] for n in nodes}
    old: Plan = gm.meta[META_KEY]
    for n in nodes:
        n.meta[META_KEY] = _undecided(before[n])
    try:
        allocate(gm, budget=budget, other_flops=old.other_flops)
    except BudgetError as e:
        for n in nodes:
            n.meta[META_KEY] = before[n]
        raise BudgetError.infeasible(e.smallest_feasible or 1.0, f"[set_budget] {e}") from e
    return dataclasses.replace(old, budget=budget, nodes=tuple(n.meta[META_KEY] for n in nodes))


def _apply(gm: fx.GraphModule, budget: float) -> Plan:
    """Select keep ratios for ``budget`` over the stored curves and write them into the graph."""
    _select(gm, budget)
    old: Plan = gm.meta[META_KEY]
    nodes = _planned(gm)
    config: ApproxConfig = gm.meta[CONFIG_META_KEY]
    if any(n.target not in ops.SAMPLED_OPS and n.meta[META_KEY].sensitivity for n in nodes):
        # Once: measured exact nodes become keep=1.0 calls; later switches only edit keep=.
        rewrite(gm, config, measured=True)
        nodes = _planned(gm)
    for n in nodes:
        if n.target in ops.SAMPLED_OPS:
            n.update_kwarg("keep", n.meta[META_KEY].keep)
            if n.meta[META_KEY].split:
                n.update_kwarg("row_keep", n.meta[META_KEY].row_keep)
    refresh_live(gm)  # exact convs' live= bounds follow the new keep ratios
    gm.recompile()
    plan = dataclasses.replace(old, budget=budget, nodes=tuple(n.meta[META_KEY] for n in nodes))
    gm.meta[META_KEY] = plan
    return plan


def set_budget(fast: nn.Module, budget: float) -> Plan:
    """Re-plan ``fast`` (an ``optimize`` result) for ``budget`` in place; returns the new plan.

    No tracing and no measuring: the selection runs again over the stored cost and sensitivity
    records. ``budget=1.0`` makes every node exact. The next forward uses the new keep ratios.
    A budget below what the exact nodes already cost raises ``BudgetError`` and leaves
    ``fast`` as it was.

    Under ``torch.distributed`` (more than one rank) it is a collective: every rank calls it at
    the same step, and ranks whose new plans differ raise ``DistributedError`` (the same
    fingerprint check as ``approxcompile.distributed.register``).

    >>> approxcompile.set_budget(fast, 0.6)     # e.g. spend more towards the end of training
    """
    budget = _check_budget(budget)
    gm = _live(fast)
    plan = _apply(gm, budget)
    _check_ranks(gm)
    return plan


def _check_ranks(gm: fx.GraphModule) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from approxcompile.distributed import _check_same_plan

        _check_same_plan(gm, dist.group.WORLD, dist.get_rank(), dist.get_world_size())


def mean_error(plan: Plan) -> float:
    """Mean planned relative squared error over the nodes that have a measured curve (0 for none)."""
    measured = [n for n in plan.nodes if n.sensitivity]
    return sum(n.est_error for n in measured) / len(measured) if measured else 0.0


# -- named schedules ---------------------------------------------------------------------------


def _constant(t: float, budget: float, fraction: float) -> float:
    return budget


def _warmup_exact(t: float, budget: float, fraction: float) -> float:
    return 1.0 if t < fraction else budget


def _anneal_to_exact(t: float, budget: float, fraction: float) -> float:
    start = 1.0 - fraction
    return budget if t < start else budget + (1.0 - budget) * min(1.0, (t - start) / fraction)


def _exact_cooldown(t: float, budget: float, fraction: float) -> float:
    return budget if t < 1.0 - fraction else 1.0


def _cosine(t: float, budget: float, fraction: float) -> float:
    return budget + (1.0 - budget) * (1.0 - math.cos(math.pi * t)) / 2.0


# (progress in [0, 1], budget, fraction) -> budget at that progress; progress 1 is the last step.
SCHEDULES: dict[str, Callable[[float, float, float], float]] = {
    "constant": _constant,
    "warmup_exact": _warmup_exact,  # exact for the first `fraction` of steps, then `budget`
    "anneal_to_exact": _anneal_to_exact,  # `budget`, then linear to exact over the last `fraction`
    "exact_cooldown": _exact_cooldown,  # `budget`, then exact at once for the last `fraction`
    "cosine": _cosine,  # `budget` rising to exact along half a cosine
}


def budget_at(
    name: str, step: int, total_steps: int, *, budget: float, fraction: float = 0.2, levels: int = 20
) -> float:
    """The budget schedule ``name`` gives step ``step`` of ``total_steps`` (0-based).

    Budgets round up to a multiple of ``1 / levels`` so a smooth schedule re-plans
    ``levels`` times at most; every schedule but ``constant`` ends exact (1.0) at the last step.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    budget = _check_budget(budget)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if total_steps < 1 or not 0 <= step < total_steps:
        raise ValueError(f"step must be in [0, total_steps={total_steps}), got {step!r}")
    t = step / (total_steps - 1) if total_steps > 1 else 1.0
    b = SCHEDULES[name](t, budget, fraction)
    return b if b == budget else min(1.0, math.ceil(b * levels - 1e-9) / levels)


@dataclass
class Scheduler:
    """Drives ``set_budget`` along a named schedule: call :meth:`step` once before every step."""

    fast: nn.Module
    name: str
    total_steps: int
    budget: float
    fraction: float = 0.2
    levels: int = 20
    steps: int = 0
    current: float | None = None
    replans: int = 0

    def __post_init__(self) -> None:
        budget_at(self.name, 0, max(self.total_steps, 1), budget=self.budget, fraction=self.fraction)
        _live(self.fast)

    def step(self) -> float:
        """Return this step's budget; re-plans only when it differs from the last step's."""
        b = budget_at(
            self.name,
            min(self.steps, self.total_steps - 1),
            self.total_steps,
            budget=self.budget,
            fraction=self.fraction,
            levels=self.levels,
        )
        if b != self.current:
            set_budget(self.fast, b)
            self.current = b
            self.replans += 1
        self.steps += 1
        return b


# -- adaptive ----------------------------------------------------------------------------------


# Kinds whose runtime call takes the Site operands positionally (conv: then stride, padding,
# dilation), so the call's arguments map back to what the kind's probe takes. A node of any
# other kind keeps the curve optimize() measured.
_ARG_LAYOUTS = ("linear", "matmul", "addmm", "baddbmm", "conv")


class _Operands(fx.Interpreter):
    """Runs the live graph exactly (eval) and keeps the operands of every sampled-op node."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.ops = kinds.runtime_ops()
        self.captured: dict[fx.Node, tuple[tuple[Any, ...], Any]] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n.target in self.ops and META_KEY in n.meta and self.ops[n.target][0].name in _ARG_LAYOUTS:
            kind, _ = self.ops[n.target]
            args, _ = self.fetch_args_kwargs_from_env(n)
            conv = tuple(args[3:6]) if kind.name == "conv" else None
            operands = tuple(args[:3]) if kind.name == "conv" else tuple(args)
            self.captured[n] = ((kind.name, *operands), conv)
        return result


def _agree(curves: dict[str, list[float]]) -> dict[str, list[float]]:
    """Average the measured errors over data-parallel ranks, so every rank selects the same plan."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not curves:
        return curves
    names = sorted(curves)
    flat = torch.tensor([e for name in names for e in curves[name]], dtype=torch.float64)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    out, at = {}, 0
    for name in names:
        out[name] = flat[at : at + len(curves[name])].tolist()
        at += len(curves[name])
    return out


def remeasure(fast: nn.Module, inputs: tuple[Any, ...], *, seed: int = 0) -> int:
    """Measure every node's error curve again on ``inputs`` with the live weights; returns how many.

    Only the stored curves change (the grid stays); call ``set_budget`` to act on them.
    Under ``torch.distributed`` the curves are averaged over ranks (a collective).
    """
    gm = _live(fast)
    config: ApproxConfig = gm.meta[CONFIG_META_KEY]
    if any(n.target not in ops.SAMPLED_OPS and n.meta[META_KEY].sensitivity for n in _planned(gm)):
        _apply(gm, gm.meta[META_KEY].budget)  # every measured node becomes a sampled-op call first
    recorder = _Operands(gm)
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            recorder.run(*inputs)
    finally:
        gm.train(was_training)
    generator = torch.Generator().manual_seed(seed)
    curves: dict[str, list[float]] = {}
    nodes: dict[str, fx.Node] = {}
    with torch.no_grad():
        for node, ((kind, *operands), conv) in recorder.captured.items():
            plan: NodePlan = node.meta[META_KEY]
            if not plan.sensitivity:
                continue
            grid = [k for k, _ in plan.sensitivity]
            curve = node_curve(kind, tuple(operands), conv, plan, grid, config, generator)
            curves[node.name], nodes[node.name] = [e for _, e in curve], node
    for name, errors in _agree(curves).items():
        plan = nodes[name].meta[META_KEY]
        curve = tuple(zip((k for k, _ in plan.sensitivity), errors, strict=True))
        nodes[name].meta[META_KEY] = plan.with_(sensitivity=curve)
    old: Plan = gm.meta[META_KEY]
    gm.meta[META_KEY] = dataclasses.replace(old, nodes=tuple(n.meta[META_KEY] for n in _planned(gm)))
    return len(curves)


def _head(value: Any, rows: int) -> Any:
    return value[:rows] if isinstance(value, torch.Tensor) and value.dim() else value


@dataclass
class Adaptive:
    """Every ``every`` steps: re-measure on the batch, then spend the least budget that holds the error.

    The budget chosen is the smallest multiple of ``1 / levels`` in ``[floor, budget]`` whose plan
    has :func:`mean_error` at most ``target``; ``budget`` when none does. Between measurements
    the plan stays as it is.
    """

    fast: nn.Module
    budget: float
    target: float
    every: int = 50
    floor: float = 0.1
    levels: int = 20
    rows: int | None = None  # measure on the first `rows` samples of the batch (None: all of it)
    steps: int = 0
    current: float | None = None
    history: list[tuple[int, float, float]] = dataclasses.field(default_factory=list)  # (step, budget, error)

    def __post_init__(self) -> None:
        self.budget = _check_budget(self.budget)
        if not (isinstance(self.target, (int, float)) and self.target > 0):
            raise ValueError(f"target must be a positive relative error, got {self.target!r}")
        if not (isinstance(self.every, int) and self.every >= 1):
            raise ValueError(f"every must be a positive number of steps, got {self.every!r}")
        _live(self.fast)

    def step(self, *inputs: Any) -> float:
        """Call before each training step with that step's model inputs; returns the budget in force."""
        if self.steps % self.every == 0:
            if self.rows is not None:
                inputs = tuple(_head(t, self.rows) for t in inputs)
            remeasure(self.fast, inputs, seed=self.steps)
            gm = _live(self.fast)
            chosen = self.budget
            low = max(1, math.ceil(self.floor * self.levels))
            # The records only (no code generated) for each candidate; the least that holds wins.
            for level in range(low, int(self.budget * self.levels + 1e-9) + 1):
                try:
                    trial = _select(gm, level / self.levels)
                except BudgetError:
                    continue
                if mean_error(trial) <= self.target:
                    chosen = level / self.levels
                    break
            plan = _apply(gm, chosen)
            _check_ranks(gm)
            self.current = chosen
            self.history.append((self.steps, chosen, mean_error(plan)))
        self.steps += 1
        assert self.current is not None
        return self.current
