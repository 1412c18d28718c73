"""Timing: how long each candidate node's training-step products take, dense and sampled.

FLOPs say what a node costs on paper; a small layer whose sampling overhead (norms,
selection, gathers, scatters) outweighs the products it saves is slower sampled than
exact. With ``ApproxConfig(measure_time=True)`` this pass runs, for every node the
selection may sample, one forward + backward of the exact op and of the sampled op at
each candidate keep ratio on the operands recorded during shape propagation (median of
``time_repeats`` runs after one warm-up), and stores them as ``NodePlan.timing``:
``((1.0, dense_seconds), (keep, seconds), ...)``. The selection then never picks a keep
ratio that is not faster than the dense op.

Off by default: timings depend on the machine and its load, while FLOP plans are
reproducible. ``tools/bench.py --measure-time`` shows the effect.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx

from approxcompile import kinds
from approxcompile.config import ApproxConfig
from approxcompile.passes.base import TimingResult
from approxcompile.passes.match import site_of
from approxcompile.passes.sensitivity import product_fn
from approxcompile.plan import META_KEY, NodePlan


def _median_seconds(run: Callable[[], None], repeats: int) -> float:
    run()  # warm-up: first-touch pages, kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _leaves(operands: tuple[Any, ...], needs: tuple[bool, ...]) -> tuple[Any, ...]:
    """Fresh leaf copies of the operands, requiring grad where the graph's operands do."""
    out = []
    needs = needs + (False,) * (len(operands) - len(needs))
    for value, need in zip(operands, needs, strict=True):
        if isinstance(value, torch.Tensor):
            value = value.detach().clone().requires_grad_(need and value.is_floating_point())
        out.append(value)
    return tuple(out)


def _node_timing(
    plan: NodePlan, kind: str, operands: tuple[Any, ...], conv: Any, config: ApproxConfig
) -> tuple[tuple[float, float], ...]:
    product = product_fn(kind, operands, conv, plan.mode)
    grads = [o for o in operands if isinstance(o, torch.Tensor) and o.requires_grad]

    def step(keep: float, training: bool) -> None:
        out = product(keep, training=training, method=plan.method, eps=config.eps)
        if grads:
            torch.autograd.grad(out, grads, torch.ones_like(out))

    timing = [(1.0, _time_step(step, 1.0, False, config.time_repeats))]
    for keep, _ in plan.sensitivity:
        timing.append((keep, _time_step(step, keep, True, config.time_repeats)))
    return tuple(timing)


def _time_step(step: Callable[[float, bool], None], keep: float, training: bool, repeats: int) -> float:
    """Median seconds of ``step(keep, training)``; the tests replace this clock with a fake one."""
    return _median_seconds(functools.partial(step, keep, training), repeats)


def measure_timing(
    gm: fx.GraphModule, captured: Mapping[str, tuple[Any, ...]], config: ApproxConfig
) -> TimingResult:
    """Fill ``timing of every node that has a sensitivity curve (graph unchanged)."""
    measured = 0
    for node in gm.graph.nodes:
        plan = node.meta.get(META_KEY)
        if plan is None or plan.reason is not None or not plan.sensitivity or node.name not in captured:
            continue
        site = site_of(gm, node, plan)
        # requires_grad of each operand: the two factors' as the graph's, the rest (bias) none
        x_at, w_at = kinds.KINDS[site.kind].factors
        needs = tuple(
            (i == x_at and plan.flops.input_grad > 0) or (i == w_at and plan.flops.weight_grad > 0)
            for i in range(max(x_at, w_at) + 1)
        )
        operands = _leaves(captured[node.name], needs)
        timing = _node_timing(plan, site.kind, operands, site.conv, config)
        node.meta[META_KEY] = plan.with_(timing=timing)
        measured += 1
    return TimingResult(graph_module=gm, modified=False, timed=measured)
