"""What ``approxcompile.optimize`` decided, as a table for people and JSON for tools.

``optimize`` stores its :class:`~approxcompile.plan.Plan` in ``GraphModule.meta["approxcompile"]``;
this module only reads it, so a report can be rebuilt from a saved JSON file as well.

>>> fast = approxcompile.optimize(model, budget=0.4, example_inputs=(x,))
>>> print(approxcompile.report(fast))          # one row per matmul / linear / conv node
>>> approxcompile.report(fast).to_json()      # the same facts, machine-readable
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from approxcompile import kinds
from approxcompile.guards import Guard, check
from approxcompile.plan import META_KEY, Flops, NodePlan, Plan

# Bumped when a key of to_dict() is renamed or removed (adding keys keeps the version).
SCHEMA_VERSION = 1

_UNITS = ((10**12, "T"), (10**9, "G"), (10**6, "M"), (10**3, "K"))


def human_flops(n: float) -> str:
    """``1234567 -> "1.23M"``: three significant digits so columns stay narrow."""
    for scale, unit in _UNITS:
        if abs(n) >= scale * 0.9995:  # 999_999 reads "1M", not "1e+03K"
            v = n / scale
            # 999.5 and up would print as "1e+03" in three significant digits
            return f"{v:.3g}{unit}" if v < 999.5 else f"{v:.0f}{unit}"
    return f"{n:.0f}"


def format_shapes(node: NodePlan) -> str:
    """Operand shapes then the output, e.g. ``64x784 @ 512x784 -> 64x512``."""
    sep = f" {kinds.symbol(node.kind)} "
    operands = sep.join("x".join(map(str, s)) or "()" for s in node.shapes)
    return f"{operands} -> {'x'.join(map(str, node.out_shape)) or '()'}"


def decided_by(n: NodePlan) -> str:
    """Which step decided the node's keep ratio: an override, the exclusions, the timing or the allocation."""
    pinned = n.fixed_keep is not None or n.row_fixed_keep is not None
    if n.settings_source != "global" and (pinned or not n.sampled):
        return n.settings_source
    if n.sampled or n.sensitivity or n.reason is None:
        measured_slower = n.reason is not None and n.reason.startswith("sampling measured")
        return "timing" if measured_slower else "allocation"
    return "exclusions"


def _keep_text(n: NodePlan) -> str:
    """The keep column: a split backward node shows dX's ratio, then dW's."""
    if not n.sampled:
        return "1"
    if n.split:
        return f"{n.keep:.2f}, dW {n.row_keep:.2f}"
    return f"{n.keep:.2f}"


def report(module: Any) -> Report:
    """The :class:`Report` of a module returned by ``approxcompile.optimize`` (or of a bare ``Plan``).

    Raises ``ValueError`` for a module that carries no plan, since that almost always means the
    caller passed the original model instead of the optimized one.
    """
    if isinstance(module, Plan):
        return Report(module)
    meta = getattr(module, "meta", None)
    plan = meta.get(META_KEY) if isinstance(meta, dict) else None
    if not isinstance(plan, Plan):
        raise ValueError(
            f"{type(module).__name__} was not produced by approxcompile.optimize: it has no "
            f"meta[{META_KEY!r}] plan; pass the module that optimize() returned"
        )
    return Report(plan)


class Report:
    """A read-only view of a :class:`Plan`: ``str()`` is a table, :meth:`to_json` is for tools."""

    def __init__(self, plan: Plan) -> None:
        self._plan = plan
        self._warnings: tuple[Guard, ...] | None = None

    @property
    def plan(self) -> Plan:
        return self._plan

    @property
    def nodes(self) -> tuple[NodePlan, ...]:
        """Every candidate node in topological order, sampled or not."""
        return self._plan.nodes

    @property
    def sampled(self) -> tuple[NodePlan, ...]:
        return tuple(n for n in self._plan.nodes if n.sampled)

    @property
    def warnings(self) -> tuple[Guard, ...]:
        """What looks wrong with the plan, each with its fix (``approxcompile.guards``)."""
        if self._warnings is None:
            self._warnings = check(self._plan)
        return self._warnings

    def __repr__(self) -> str:
        p = self._plan
        return (
            f"Report(budget={p.budget}, method={p.method!r}, sampled={len(self.sampled)}/{len(p.nodes)}, "
            f"fraction={p.fraction:.3f})"
        )

    # -- the table ---------------------------------------------------------------------------

    def _rows(self) -> list[list[str]]:
        rows = []
        for n in self._plan.nodes:
            rows.append(
                [
                    n.name,
                    n.op,
                    format_shapes(n),
                    str(n.inner),
                    human_flops(n.flops.total),
                    _keep_text(n),
                    f"{n.k}/{n.inner}" + (f", dW {n.row_k}/{n.rows}" if n.split else ""),
                    human_flops(n.cost()),
                    f"{n.est_error:.1e}" if n.sampled else "-",
                    n.method if n.sampled else "-",
                    decided_by(n),
                    "" if n.sampled else (n.reason or "kept exact by the allocation"),
                ]
            )
        return rows

    def __str__(self) -> str:
        p = self._plan
        header = [
            "node", "op", "shapes", "n", "dense", "keep", "k/n", "approx", "err", "method", "decided by",
            "exact because",
        ]  # fmt: skip
        rows = self._rows()
        # The last column (the reason) is left unpadded so a long reason runs past the edge
        # instead of widening every row.
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
        right = {3, 4, 5, 6, 7, 8}  # numbers read best right-aligned

        def line(cells: Sequence[str]) -> str:
            parts = [
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells[:-1], widths, strict=True))
            ]
            return "  ".join([*parts, cells[-1]]).rstrip()

        rule = "-" * (sum(widths) + 2 * len(widths) + len(header[-1]))
        head = f"approxcompile plan: method={p.method}, budget={p.budget:g}"
        head += ", mode=backward (forward exact; k/n is dX's output features)" if p.mode == "backward" else ""
        head += ", scores=weights" if p.scores == "weights" else ""
        out = [head, rule, line(header), rule]
        out += [line(r) for r in rows] or ["(no matmul / linear / conv nodes)"]
        out += [
            rule,
            f"dense training FLOPs      {human_flops(p.dense_flops)}",
            f"planned FLOPs (overhead)  {human_flops(p.approx_flops)}"
            f"  = {p.fraction:.3f} of dense (budget {p.budget:g})",
            f"counted by FlopCounter    {human_flops(p.counted_flops)}  (products, no overhead)",
            f"outside matmul/conv       {human_flops(p.other_flops)}",
            f"sampled nodes             {len(self.sampled)} / {len(p.nodes)} candidates",
            f"captured by               {p.frontend}"
            + (f" ({p.frontend_reason})" if p.frontend_reason else ""),
        ]
        if p.note:
            out.append(f"note: {p.note}")
        out += [f"warning: {g}" for g in self.warnings]
        return "\n".join(out)

    # -- machine-readable --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Everything in the plan as plain JSON types.

        Keys (stable; see ``SCHEMA_VERSION``):

        - ``schema``, then every field of :class:`~approxcompile.plan.Plan` but ``nodes`` and
          ``other_flops``: ``budget``, ``method``, ``mode`` (``forward``/``backward``), ``scores``
          (``activations``/``weights``), ``note`` (str or null)
        - ``totals``: ``dense_flops``, ``planned_flops`` (overhead included, what the budget
          limits), ``counted_flops`` (products only, what ``FlopCounterMode`` measures),
          ``other_flops`` (outside matmul/linear/conv), ``fraction`` (planned / dense),
          ``sampled``, ``candidates``
        - ``nodes``: one object per candidate node with every field of
          :class:`~approxcompile.plan.NodePlan` (but ``site``, which refers to graph nodes):
          ``name``, ``kind``, ``op``, ``shapes`` (list of int lists), ``out_shape``, ``inner``,
          ``keep``, ``k``, ``method``, ``min_k``, ``fixed_keep``, ``est_error`` (relative
          squared error; a split backward node: dX's plus dW's), ``reason`` (null when sampled),
          ``settings_source``, ``mode``, ``rows`` (backward mode: the batch rows dW samples),
          ``row_keep`` (backward-mode linear / conv: dW's ratio, ``keep`` is then dX's; null where
          dW shares ``keep``), ``row_fixed_keep``, ``row_sensitivity`` (dW's curve; ``sensitivity``
          is then dX's), ``row_overhead_fixed``, ``row_overhead_per_kept``, ``dense_flops`` (the
          ``flops`` field),
          ``overhead_fixed``, ``overhead_per_kept``, ``sensitivity`` (list of ``[keep, error]``),
          ``timing`` (list of ``[keep, seconds]`` measured with ``measure_time``; keep 1.0 is
          the dense op, empty when not measured); and what follows from them: ``sampled``,
          ``approx_flops`` (FLOPs as ``dense_flops``: ``forward``/``input_grad``/``weight_grad``/
          ``total``), ``overhead`` and ``cost`` (approx total plus overhead).
        - ``warnings``: the guard-rail warnings (``approxcompile.guards``), each with ``check``
          (``high-error``/``exact-share``), ``nodes``, ``message`` and ``fix``.
        """
        p = self._plan
        fields = dataclasses.fields(p)
        top = {f.name: _json(getattr(p, f.name)) for f in fields if f.name not in _PLAN_ELSEWHERE}
        return {
            "schema": SCHEMA_VERSION,
            **top,
            "totals": {
                "dense_flops": p.dense_flops,
                "planned_flops": p.approx_flops,
                "counted_flops": p.counted_flops,
                "other_flops": p.other_flops,
                "fraction": p.fraction,
                "sampled": len(self.sampled),
                "candidates": len(p.nodes),
            },
            "nodes": [_node_dict(n) for n in p.nodes],
            "warnings": [
                {"check": g.check, "nodes": list(g.nodes), "message": g.message, "fix": g.fix}
                for g in self.warnings
            ],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as JSON text; :meth:`from_dict` of its ``json.loads`` gives the plan back."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Rebuild a report from :meth:`to_dict` output, e.g. to compare two saved runs.

        A key missing from ``data`` (written by an older version) takes the field's default.
        """
        nodes = tuple(NodePlan(**_fields_from(NodePlan, d)) for d in data["nodes"])
        plan = _fields_from(Plan, {**data, "nodes": nodes, "other_flops": data["totals"]["other_flops"]})
        return cls(Plan(**plan))


# Plan fields to_dict writes elsewhere than the top level, and NodePlan fields it leaves out.
_PLAN_ELSEWHERE = ("nodes", "other_flops")
_NODE_LEFT_OUT = ("site",)
# Fields whose JSON key is not their name.
_KEYS = {"flops": "dense_flops"}


def _json(value: Any) -> Any:
    """A field value as plain JSON types (tuples become lists, FLOP records objects)."""
    if isinstance(value, Flops):
        return {"forward": value.forward, "input_grad": value.input_grad, "weight_grad": value.weight_grad,
                "total": value.total}  # fmt: skip
    if isinstance(value, tuple):
        return [_json(v) for v in value]
    return value


def _from_json(name: str, value: Any) -> Any:
    """The inverse of :func:`_json` for the field ``name``."""
    if name == "flops":
        return Flops(**{k: v for k, v in value.items() if k != "total"})
    if name in ("sensitivity", "row_sensitivity", "timing"):
        return tuple((float(r), float(e)) for r, e in value)
    if name == "shapes":
        return tuple(tuple(s) for s in value)
    if name == "out_shape":
        return tuple(value)
    return value


def _fields_from(cls: type[Any], data: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``cls`` from a to_dict object; absent keys are left to the defaults."""
    out = {}
    for f in dataclasses.fields(cls):
        key = _KEYS.get(f.name, f.name)
        if f.name not in _NODE_LEFT_OUT and key in data:
            out[f.name] = _from_json(f.name, data[key])
    return out


def _node_dict(n: NodePlan) -> dict[str, Any]:
    fields = {
        _KEYS.get(f.name, f.name): _json(getattr(n, f.name))
        for f in dataclasses.fields(n)
        if f.name not in _NODE_LEFT_OUT
    }
    derived = {"sampled": n.sampled, "approx_flops": _json(n.approx_flops)}
    derived.update(overhead=n.overhead, cost=n.cost())
    return {**fields, **derived}
