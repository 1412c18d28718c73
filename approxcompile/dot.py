"""The rewritten graph as a networkx graph and as Graphviz DOT text, sampled nodes highlighted.

DOT is written by hand so that neither pydot nor pygraphviz is needed; render it with
``dot -Tsvg graph.dot -o graph.svg``.

>>> write_dot(approxcompile.optimize(model, 0.4, example_inputs=(x,)), "graph.dot")
"""

from __future__ import annotations

import os
from typing import Any

import networkx as nx
import torch.fx

from approxcompile.ops import SAMPLED_OPS
from approxcompile.plan import META_KEY, NodePlan, Plan

SAMPLED_COLOR = "#f4a261"  # orange: the node runs on a sample of its inner dimension
EXACT_COLOR = "#a8dadc"  # pale blue: a candidate the plan left exact, labelled with why


def _target_text(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    """What the node calls, short enough for a graph label (``Linear``, ``relu``, ``sampled_linear``)."""
    if node.op == "call_module":
        try:
            return f"{node.target}: {type(gm.get_submodule(str(node.target))).__name__}"
        except AttributeError:
            return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def _node_plan(node: torch.fx.Node) -> NodePlan | None:
    plan = node.meta.get(META_KEY)
    return plan if isinstance(plan, NodePlan) else None


def to_networkx(gm: torch.fx.GraphModule) -> nx.DiGraph:
    """A node per fx node (keyed by its name) and an edge per data dependency.

    Every node has ``op``, ``target`` and ``label``; a node carrying a :class:`NodePlan` also has
    ``plan_name``, ``keep``, ``k``, ``inner``, ``sampled``, ``reason``, ``candidate=True`` and
    ``rewritten`` (it calls an ``approxcompile.ops`` function). The graph attribute ``plan``
    holds the module's :class:`Plan`, if any.
    """
    g = nx.DiGraph()
    plan = gm.meta.get(META_KEY) if isinstance(getattr(gm, "meta", None), dict) else None
    if isinstance(plan, Plan):
        g.graph["plan"] = plan
    for node in gm.graph.nodes:
        target = _target_text(gm, node)
        attrs: dict[str, Any] = {"op": node.op, "target": target}
        label = f"{node.name}\n{target}" if target != node.name else node.name
        np_ = _node_plan(node)
        if np_ is not None:
            if node.op != "call_module" and np_.name != node.name:
                # A rewritten node is named after its op; the plan keeps the module name.
                label = f"{node.name}\n{np_.name}: {target}"
            attrs.update(
                plan_name=np_.name,
                keep=np_.keep,
                k=np_.k,
                inner=np_.inner,
                sampled=np_.sampled,
                reason=np_.reason,
                candidate=True,
                # False on a plan not yet applied: the node still runs its original op.
                rewritten=node.op == "call_function" and node.target in SAMPLED_OPS,
            )
            if np_.sampled:
                label += f"\nkeep={np_.keep:.2f} ({np_.k}/{np_.inner})"
            else:
                label += f"\nexact: {np_.reason or 'kept exact by the allocation'}"
        attrs["label"] = label
        g.add_node(node.name, **attrs)
        for src in node.all_input_nodes:
            g.add_edge(src.name, node.name)
    return g


def quote(text: str) -> str:
    """A DOT double-quoted string: backslashes and quotes escaped, newlines as centred line breaks."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\r\n", "\n").replace("\n", "\\n") + '"'


def to_dot(gm: torch.fx.GraphModule, name: str = "approxcompile") -> str:
    """Graphviz DOT text for :func:`to_networkx` of ``gm``."""
    g = to_networkx(gm)
    lines = [
        f"digraph {quote(name)} {{",
        "  rankdir=TB;",
        '  node [shape=box, style="rounded", fontname="Helvetica"];',
    ]
    plan = g.graph.get("plan")
    if isinstance(plan, Plan):
        sampled = sum(n.sampled for n in plan.nodes)
        caption = (
            f"method={plan.method}, budget={plan.budget:g}, planned {plan.fraction:.3f} of dense, "
            f"{sampled}/{len(plan.nodes)} nodes sampled"
        )
        lines.append(f"  label={quote(caption)};")
        lines.append("  labelloc=t;")
    for node, attrs in g.nodes(data=True):
        style = ""
        if attrs.get("sampled"):
            style = f', style="rounded,filled,bold", fillcolor={quote(SAMPLED_COLOR)}'
        elif attrs.get("candidate"):
            style = f', style="rounded,filled", fillcolor={quote(EXACT_COLOR)}'
        elif attrs["op"] in ("placeholder", "output", "get_attr"):
            style = ", shape=ellipse"
        lines.append(f"  {quote(node)} [label={quote(attrs['label'])}{style}];")
    for src, dst in g.edges:
        lines.append(f"  {quote(src)} -> {quote(dst)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_dot(gm: torch.fx.GraphModule, path: str | os.PathLike[str]) -> None:
    """Write :func:`to_dot` of ``gm`` to ``path`` (UTF-8)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(to_dot(gm))
