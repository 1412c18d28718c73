"""The plan as a picture: keep ratio and FLOP share per node, error against budget, and the graph.

Needs matplotlib (``pip install 'approxcompile[plot]'``), not graphviz: the graph panel is laid out
by topological depth with networkx and drawn with matplotlib.

>>> plot_plan(approxcompile.optimize(model, 0.4, example_inputs=(x,)), "plan.png")

``approxcompile inspect ... --plot plan.png`` draws the same from the shell.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import networkx as nx

from approxcompile.guards import sweep
from approxcompile.plan import META_KEY, Plan

SAMPLED = "#f4a261"  # the colours of approxcompile.dot: orange sampled, pale blue exact
EXACT = "#a8dadc"
OTHER = "#d9d9d9"


class PlotUnavailable(ImportError):
    """matplotlib is not installed."""


def require_matplotlib() -> Any:
    """The ``matplotlib.figure`` module, or an error that says how to install it."""
    try:
        return importlib.import_module("matplotlib.figure")
    except ImportError as e:
        raise PlotUnavailable("drawing a plan needs matplotlib: pip install 'approxcompile[plot]'") from e


def _plan_of(source: Any) -> Plan:
    if isinstance(source, Plan):
        return source
    plan = getattr(source, "meta", {}).get(META_KEY)
    if not isinstance(plan, Plan):
        raise ValueError(
            f"{type(source).__name__} carries no approxcompile plan; pass what optimize() returned"
        )
    return plan


def _per_node(ax: Any, plan: Plan) -> None:
    names = [n.name for n in plan.nodes]
    ys = range(len(names))
    dense = [n.flops.total / plan.dense_flops for n in plan.nodes]
    planned = [n.cost() / plan.dense_flops for n in plan.nodes]
    colors = [SAMPLED if n.sampled else EXACT for n in plan.nodes]
    ax.barh([y + 0.2 for y in ys], dense, height=0.4, color=OTHER, label="dense share")
    ax.barh([y - 0.2 for y in ys], planned, height=0.4, color=colors, label="planned share")
    for y, n in zip(ys, plan.nodes, strict=True):
        text = f"keep {n.keep:.2f} ({n.k}/{n.inner})" if n.sampled else "exact"
        ax.text(max(dense[y], planned[y]) + 0.005, y, text, va="center", fontsize=7)
    ax.set_yticks(list(ys), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("fraction of the dense training FLOPs")
    ax.set_xlim(0, max(dense + [0.01]) * 1.45)
    ax.set_title("per node: FLOP share and keep ratio", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")


def _error_curve(ax: Any, plan: Plan) -> None:
    points = sweep(plan)
    if not points:
        ax.text(0.5, 0.5, "no feasible budget to sweep", ha="center", transform=ax.transAxes)
        return
    budgets = [p.budget for p in points]
    ax.plot(budgets, [p.total_error for p in points], marker=".", label="summed error")
    ax.plot(budgets, [p.max_error for p in points], marker=".", label="largest node error")
    ax.axvline(plan.budget, color="0.4", linestyle="--", linewidth=1)
    ax.text(plan.budget, ax.get_ylim()[1], f" budget {plan.budget:g}", va="top", fontsize=7)
    ax.set_xlabel("budget (fraction of dense training FLOPs)")
    ax.set_ylabel("planned relative squared error")
    ax.set_title("planned error against budget (allocation re-run on measured sensitivities)", fontsize=9)
    ax.legend(fontsize=7)


def _graph(ax: Any, gm: Any) -> None:
    """The fx nodes by topological depth (left to right); products coloured by decision, others small dots."""
    from approxcompile.dot import to_networkx

    g = to_networkx(gm)
    g.remove_nodes_from([n for n, d in g.nodes(data=True) if d["op"] == "get_attr"])  # parameters
    for depth, layer in enumerate(nx.topological_generations(g)):
        for node in layer:
            g.nodes[node]["depth"] = depth
    pos = nx.multipartite_layout(g, subset_key="depth")
    candidates = [n for n, d in g.nodes(data=True) if d.get("candidate")]
    others = [n for n in g.nodes if n not in candidates]
    nx.draw_networkx_edges(g, pos, ax=ax, arrows=False, width=0.6, edge_color="0.6")
    nx.draw_networkx_nodes(g, pos, nodelist=others, ax=ax, node_size=12, node_color="0.5")
    colors = [SAMPLED if g.nodes[n].get("sampled") else EXACT for n in candidates]
    nx.draw_networkx_nodes(
        g, pos, nodelist=candidates, ax=ax, node_size=160, node_color=colors, edgecolors="0.3"
    )
    for n in candidates:
        d = g.nodes[n]
        text = f"{d.get('plan_name', n)}\n" + (f"keep {d['keep']:.2f}" if d.get("sampled") else "exact")
        ax.annotate(text, pos[n], xytext=(0, 9), textcoords="offset points", ha="center", fontsize=6)
    ax.set_title("graph (orange: sampled, blue: exact candidate, grey: other ops)", fontsize=9)
    ax.axis("off")


def plot_plan(source: Any, path: str | os.PathLike[str]) -> Path:
    """Draw the plan of ``source`` (a module ``optimize`` returned, or a ``Plan``) to ``path``.

    The format follows the suffix (``.png``, ``.svg``, ``.pdf``). A bare ``Plan`` has no graph,
    so its picture has the two plan panels only.
    """
    figure = require_matplotlib()
    plan = _plan_of(source)
    has_graph = not isinstance(source, Plan)
    rows = max(len(plan.nodes), 1)
    fig = figure.Figure(figsize=(12, 3.2 + 0.22 * rows + (3.0 if has_graph else 0.0)), layout="constrained")
    grid = fig.add_gridspec(2 if has_graph else 1, 2, height_ratios=[1.4, 1] if has_graph else None)
    _per_node(fig.add_subplot(grid[0, 0]), plan)
    _error_curve(fig.add_subplot(grid[0, 1]), plan)
    if has_graph:
        _graph(fig.add_subplot(grid[1, :]), source)
    fig.suptitle(
        f"approxcompile plan: method={plan.method}, budget={plan.budget:g}, "
        f"planned {plan.fraction:.3f} of dense, "
        f"{sum(n.sampled for n in plan.nodes)}/{len(plan.nodes)} sampled",
        fontsize=10,
    )
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
