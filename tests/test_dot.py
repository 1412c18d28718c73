"""to_networkx / write_dot: every fx node appears, sampled nodes are highlighted, DOT is well formed."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

import approxcompile
from approxcompile.dot import EXACT_COLOR, SAMPLED_COLOR, quote, to_dot, to_networkx, write_dot
from approxcompile.ops import sampled_linear
from approxcompile.plan import META_KEY, Flops, NodePlan, Plan
from tests.models import mlp

QUOTED = r'"((?:[^"\\]|\\.)*)"'
NODE_RE = re.compile(rf"^\s*{QUOTED}\s*\[(.*)\];$")
EDGE_RE = re.compile(rf"^\s*{QUOTED}\s*->\s*{QUOTED};$")
WEIRD_REASON = 'has "quotes", a back\\slash\nand a newline'


def _unquote(s: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), s)


def parse_dot(text: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """A strict reader for the subset write_dot emits: one statement per line, braces balanced."""
    depth, in_str, escaped = 0, False, False
    for ch in text:
        if in_str:
            in_str, escaped = (in_str, False) if escaped else (ch != '"', ch == "\\")
        elif ch == '"':
            in_str = True
        elif ch in "{}":
            depth += 1 if ch == "{" else -1
            assert depth >= 0, "'}' before '{'"
    assert depth == 0 and not in_str, "unbalanced braces or quotes"
    lines = text.strip().splitlines()
    assert lines[0].startswith("digraph ") and lines[0].endswith("{") and lines[-1] == "}"
    nodes: dict[str, str] = {}
    edges: list[tuple[str, str]] = []
    for line in lines[1:-1]:
        if m := EDGE_RE.match(line):
            edges.append((_unquote(m.group(1)), _unquote(m.group(2))))
        elif m := NODE_RE.match(line):
            nodes[_unquote(m.group(1))] = m.group(2)
        else:
            assert re.match(r"^\s*[a-z]+(=\S.*)?(\s*\[.*\])?;$", line), f"unexpected DOT line {line!r}"
    for src, dst in edges:
        assert src in nodes and dst in nodes, f"edge {src} -> {dst} names an undeclared node"
    return nodes, edges


def _label(attrs: str) -> str:
    m = re.search(rf"label={QUOTED}", attrs)
    assert m, attrs
    return _unquote(m.group(1))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _plan(name: str, n: int, **kw: object) -> NodePlan:
    return NodePlan(
        name=name, kind="linear", op="Linear", shapes=((8, n), (32, n)), out_shape=(8, 32), inner=n,
        flops=Flops(1, 1, 1), **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def hand_rewritten() -> torch.fx.GraphModule:
    """fc2 replaced by sampled_linear as the rewrite pass would; fc1/fc3 exact with reasons."""
    gm = torch.fx.symbolic_trace(Net())
    nodes = {n.name: n for n in gm.graph.nodes}
    fc2 = nodes["fc2"]
    with gm.graph.inserting_before(fc2):
        w, b = gm.graph.get_attr("fc2.weight"), gm.graph.get_attr("fc2.bias")
        new = gm.graph.call_function(sampled_linear, (fc2.args[0], w, b), {"keep": 0.35})
    fc2.replace_all_uses_with(new)
    gm.graph.erase_node(fc2)
    new.meta[META_KEY] = _plan("fc2", 32, keep=0.35, k=11, est_error=0.1)
    nodes["fc1"].meta[META_KEY] = _plan("fc1", 16, reason="first candidate node")
    nodes["fc3"].meta[META_KEY] = _plan("fc3", 32, reason=WEIRD_REASON)
    gm.graph.lint()
    gm.recompile()
    plans = tuple(n.meta[META_KEY] for n in gm.graph.nodes if META_KEY in n.meta)
    gm.meta[META_KEY] = Plan(budget=0.4, method="topk", nodes=plans, other_flops=0)
    return gm


def test_networkx_has_every_node_edge_and_plan_attribute() -> None:
    gm = hand_rewritten()
    g = to_networkx(gm)
    assert list(g.nodes) == [n.name for n in gm.graph.nodes]
    assert set(g.edges) == {(i.name, n.name) for n in gm.graph.nodes for i in n.all_input_nodes}
    sampled = g.nodes["sampled_linear"]
    assert sampled["op"] == "call_function" and sampled["target"] == "sampled_linear"
    assert (sampled["keep"], sampled["k"], sampled["inner"], sampled["sampled"]) == (0.35, 11, 32, True)
    assert sampled["rewritten"] is True and sampled["plan_name"] == "fc2" and sampled["reason"] is None
    assert g.nodes["fc1"]["sampled"] is False and g.nodes["fc1"]["reason"] == "first candidate node"
    assert g.nodes["fc1"]["target"] == "fc1: Linear" and g.nodes["fc1"]["rewritten"] is False
    assert "keep" not in g.nodes["x"] and "candidate" not in g.nodes["relu"]
    assert g.graph["plan"] is gm.meta[META_KEY]


def test_dot_highlights_sampled_and_labels_exact_candidates() -> None:
    nodes, edges = parse_dot(to_dot(hand_rewritten()))
    sampled = nodes["sampled_linear"]
    assert f'fillcolor="{SAMPLED_COLOR}"' in sampled
    assert _label(sampled) == "sampled_linear\nfc2: sampled_linear\nkeep=0.35 (11/32)"
    assert f'fillcolor="{EXACT_COLOR}"' in nodes["fc1"]
    assert _label(nodes["fc1"]).endswith("exact: first candidate node")
    assert "fillcolor" not in nodes["relu"] and "fillcolor" not in nodes["x"]
    assert ("relu", "sampled_linear") in edges and ("sampled_linear", "relu_1") in edges


def test_dot_escapes_quotes_backslashes_and_newlines() -> None:
    text = to_dot(hand_rewritten())
    nodes, _ = parse_dot(text)  # would fail on a raw newline or an unescaped quote
    assert _label(nodes["fc3"]) == f"fc3\nfc3: Linear\nexact: {WEIRD_REASON}"
    assert r"has \"quotes\", a back\\slash\nand a newline" in text
    assert quote('a"b\\c\nd') == r'"a\"b\\c\nd"'


def test_write_dot(tmp_path: Path) -> None:
    gm = hand_rewritten()
    path = tmp_path / "g.dot"
    write_dot(gm, path)
    assert path.read_text(encoding="utf-8") == to_dot(gm)


def test_plain_traced_module_has_no_highlight() -> None:
    text = to_dot(torch.fx.symbolic_trace(Net()))
    nodes, edges = parse_dot(text)
    assert "fillcolor" not in "".join(nodes.values())
    assert ("fc1", "relu") in edges
    assert not any(line.strip().startswith("label=") for line in text.splitlines()), "no plan, no caption"


def test_dot_of_optimized_mlp() -> None:
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    gm = approxcompile.optimize(mlp(), 0.4, example_inputs=(x,))
    nodes, edges = parse_dot(to_dot(gm))
    plan = gm.meta[META_KEY]
    highlighted = [name for name, attrs in nodes.items() if SAMPLED_COLOR in attrs]
    assert len(highlighted) == sum(n.sampled for n in plan.nodes) > 0
    for name in highlighted:
        assert re.search(r"keep=\d\.\d\d \(\d+/\d+\)", _label(nodes[name]))
    assert _label(nodes["layers_0"]).endswith("exact: " + plan.nodes[0].reason)
    assert len(edges) == sum(len(n.all_input_nodes) for n in gm.graph.nodes)
