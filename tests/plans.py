"""Hand-built node plans for tests that check the allocation and the report without tracing a model."""

from __future__ import annotations

from typing import Any

from approxcompile.plan import Flops, NodePlan


def linear_plan(name: str, m: int, n: int, p: int, *, flops: Flops | None = None, **kw: Any) -> NodePlan:
    """A dense ``nn.Linear`` node ``(m, n) @ (p, n)ᵀ``: three products of ``2·m·n·p`` FLOPs by default."""
    f = 2 * m * n * p
    return NodePlan(
        name=name,
        kind="linear",
        op="Linear",
        shapes=((m, n), (p, n)),
        out_shape=(m, p),
        inner=n,
        flops=flops if flops is not None else Flops(f, f, f),
        **kw,
    )
