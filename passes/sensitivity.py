"""Sensitivity: how much each node's output suffers at each candidate keep ratio.

For every node the selection may still sample, run the sampled op on the operands
recorded during shape propagation and store the relative squared error
``|Y_approx - Y|^2 / |Y|^2`` (bias left out, averaged over a few draws for the random
methods, with a private generator so the user's RNG stream is untouched) as
``NodePlan.sensitivity``: a tuple of ``(keep, error)`` pairs, ``k >= min_k``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx

from approxcompile import kinds
from approxcompile.choices import Mode
from approxcompile.config import ApproxConfig
from approxcompile.passes.base import SensitivityResult
from approxcompile.passes.match import site_of
from approxcompile.plan import META_KEY, NodePlan, aligned_count, conv_align
from approxcompile.progress import Bar


def product_fn(
    kind: str, operands: tuple[Any, ...], conv: Any, mode: Mode = "forward"
) -> Callable[..., torch.Tensor]:
    """A function ``(keep, training, generator) -> output`` of the node's product, bias left out.

    ``mode="backward"``: the backward-sampling op (exact output, sampled gradients).
    """
    return kinds.KINDS[kind].probe(operands, conv, mode)


def _gradients(kind: str, operands: tuple[Any, ...], conv: Any) -> Callable[..., torch.Tensor]:
    """Backward mode: ``(keep, ...) -> [dX, dW]`` flattened, for a fixed Gaussian ``dY``.

    The forward is exact, so the error that matters is the gradients'; the real ``dY`` is
    unknown at compile time and a seeded Gaussian stands in for it.
    """
    x, w = (t.detach().requires_grad_() for t in operands[:2])
    product = product_fn(kind, (x, w, *operands[2:]), conv, "backward")
    shape = product(1.0, training=False).shape
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(x.dtype)

    def grads(keep: float, **kw: Any) -> torch.Tensor:
        with torch.enable_grad():
            dx, dw = torch.autograd.grad(product(keep, **kw), (x, w), dy)
        return torch.cat([dx.flatten(), dw.flatten()])

    return grads


def _split_curves(
    kind: str,
    operands: tuple[Any, ...],
    conv: Any,
    grids: tuple[list[float], list[float]],
    method: str,
    config: ApproxConfig,
    generator: torch.Generator,
) -> tuple[tuple[tuple[float, float], ...], tuple[tuple[float, float], ...]]:
    """Backward mode with two ratios: dX's ``(keep, error)`` curve and dW's, from the same draws.

    The two products are sampled independently and dX's error depends on ``keep`` only (dW's
    on ``row_keep`` only), so draw ``i`` takes ``keep=grids[0][i]`` and ``row_keep=grids[1][i]``
    at once (1.0, exact, where one grid is shorter): no more probes than one shared curve.
    """
    x, w = (t.detach().requires_grad_() for t in operands[:2])
    product = product_fn(kind, (x, w, *operands[2:]), conv, "backward")
    shape = product(1.0, training=False).shape
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(x.dtype)

    def grads(keep: float, row_keep: float, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            dx, dw = torch.autograd.grad(product(keep, row_keep=row_keep, **kw), (x, w), dy)
        return dx.float(), dw.float()

    exact = grads(1.0, 1.0, training=False)
    denoms = [float(e.pow(2).sum()) for e in exact]
    xs, ws = grids
    draws = 1 if method == "topk" else config.sensitivity_draws
    curves: tuple[list[tuple[float, float]], list[tuple[float, float]]] = ([], [])
    for i in range(max(len(xs), len(ws))):
        keeps = (xs[i] if i < len(xs) else 1.0, ws[i] if i < len(ws) else 1.0)
        totals = [0.0, 0.0]
        for _ in range(draws):
            approx = grads(*keeps, training=True, method=method, eps=config.eps, generator=generator)
            for j in (0, 1):
                totals[j] += float((approx[j] - exact[j]).pow(2).sum())
        for j, grid in enumerate(grids):
            if i < len(grid):
                curves[j].append((keeps[j], totals[j] / draws / denoms[j] if denoms[j] > 0 else 0.0))
    return tuple(curves[0]), tuple(curves[1])


def row_grid(plan: NodePlan, config: ApproxConfig) -> list[float]:
    """The dW ratios a split backward plan measures: ``keep_grid`` where it drops a batch row.

    Or the pinned one: ``row_fixed_keep``, else ``fixed_keep`` (which pins both products).
    """
    pinned = plan.row_fixed_keep if plan.row_fixed_keep is not None else plan.fixed_keep
    if pinned is not None:
        return [pinned]
    ratios = sorted(set(config.keep_grid), reverse=True)
    return [r for r in ratios if aligned_count(r, plan.rows, 1) < plan.rows]  # align 1: kept_count


def _curve(
    product: Callable[..., torch.Tensor],
    n: int,
    grid: list[float],
    method: str,
    config: ApproxConfig,
    generator: torch.Generator,
) -> tuple[tuple[float, float], ...]:
    exact = product(1.0, training=False).float()
    denom = float(exact.pow(2).sum())
    draws = 1 if method == "topk" else config.sensitivity_draws
    curve = []
    for keep in grid:
        total = 0.0
        for _ in range(draws):
            approx = product(keep, training=True, method=method, eps=config.eps, generator=generator)
            total += float((approx.float() - exact).pow(2).sum())
        curve.append((keep, total / draws / denom if denom > 0 else 0.0))
    return tuple(curve)


def node_curve(
    kind: str,
    operands: tuple[Any, ...],
    conv: Any,
    plan: NodePlan,
    grid: list[float],
    config: ApproxConfig,
    generator: torch.Generator,
) -> tuple[tuple[float, float], ...]:
    """One node's ``(keep, error)`` curve over ``grid`` on ``operands`` (also the adaptive schedule's).

    A split backward plan: dX's curve (``sensitivity``; dW's is ``row_sensitivity``).
    """
    if plan.split:
        return _split_curves(kind, operands, conv, (grid, []), plan.method, config, generator)[0]
    if plan.mode == "backward":
        product = _gradients(kind, operands, conv)
    else:
        product = product_fn(kind, operands, conv)
    return _curve(product, plan.inner, grid, plan.method, config, generator)


def _count(gm: fx.GraphModule, captured: Mapping[str, tuple[Any, ...]]) -> int:
    """Nodes the pass will measure, for the progress bar."""
    plans = ((n.name, n.meta.get(META_KEY)) for n in gm.graph.nodes)
    return sum(p is not None and p.reason is None and name in captured for name, p in plans)


def measure_sensitivity(
    gm: fx.GraphModule, captured: Mapping[str, tuple[Any, ...]], config: ApproxConfig
) -> SensitivityResult:
    """Fill ``sensitivity of every node not already excluded (a fixed keep is measured alone)."""
    generator = torch.Generator().manual_seed(config.seed)
    measured = 0
    bar = Bar("sensitivity", _count(gm, captured))
    with torch.no_grad():
        for node in gm.graph.nodes:
            plan = node.meta.get(META_KEY)
            if plan is None or plan.reason is not None or node.name not in captured:
                continue
            site = site_of(gm, node, plan)
            align = config.align
            if plan.kind == "conv":
                tensors = [a for a in captured[node.name] if isinstance(a, torch.Tensor)]
                align = conv_align(align, tensors[0].device.type if tensors else "cpu")
            ks = {aligned_count(r, plan.inner, align) for r in config.keep_grid}
            grid = [k / plan.inner for k in sorted(ks, reverse=True) if plan.min_k <= k < plan.inner]
            if plan.fixed_keep is not None:
                grid = [plan.fixed_keep]
            if plan.split:  # dX over ``grid``, dW over its own ratios, from the same draws
                grids = (grid, row_grid(plan, config))
                operands = captured[node.name]
                dx, dw = _split_curves(site.kind, operands, site.conv, grids, plan.method, config, generator)
                node.meta[META_KEY] = plan.with_(sensitivity=dx, row_sensitivity=dw)
            else:
                curve = node_curve(site.kind, captured[node.name], site.conv, plan, grid, config, generator)
                node.meta[META_KEY] = plan.with_(sensitivity=curve)
            measured += 1
            bar.update()
    bar.close()
    return SensitivityResult(graph_module=gm, modified=False, measured=measured)
