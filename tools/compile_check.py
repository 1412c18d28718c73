"""Does ``torch.compile`` see a rewritten model whole? Graph breaks and fullgraph, per model.

For each benchmark model (tools/bench_models.py) at each budget, optimizes it, then

- counts ``torch._dynamo.explain`` graphs and graph breaks of one training forward
  (with the reasons, deduplicated);
- compiles it with ``torch.compile(fullgraph=True)`` and trains one step, reporting
  success or the exception;
- lists the warnings Dynamo printed while doing so.

    .venv/bin/python tools/compile_check.py                 # mlp and cnn at 0.4, quick sizes
    .venv/bin/python tools/compile_check.py --size full --models mlp,cnn,transformer
"""

from __future__ import annotations

import argparse
import copy
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from bench_models import FACTORIES, build

import approxcompile


def check(model_name: str, budget: float, size: str) -> dict[str, Any]:
    w = build(model_name, size, seed=0)  # type: ignore[arg-type]
    fast = approxcompile.optimize(copy.deepcopy(w.model), budget, example_inputs=(w.x,)).train()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fast)(w.x)
    reasons = sorted({str(b.reason).splitlines()[0][:160] for b in explained.break_reasons})
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            compiled = torch.compile(fast, fullgraph=True)
            F.cross_entropy(compiled(w.x), w.y).backward()
            full = "ok"
        except Exception as e:  # report, do not stop: this is a diagnostic
            full = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return {
        "model": model_name,
        "budget": budget,
        "graphs": explained.graph_count,
        "graph_breaks": explained.graph_break_count,
        "break_reasons": reasons,
        "fullgraph": full,
        "warnings": sorted({str(c.message).splitlines()[0][:160] for c in caught}),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mlp,cnn", help="comma-separated: " + ", ".join(FACTORIES))
    p.add_argument("--budgets", default="0.4")
    p.add_argument("--size", default="quick", choices=("quick", "full"))
    args = p.parse_args(argv)
    rows = []
    for m in args.models.split(","):
        for b in args.budgets.split(","):
            r = check(m.strip(), float(b), args.size)
            rows.append(r)
            print(
                f"{r['model']}@{r['budget']}: {r['graphs']} graph(s), {r['graph_breaks']} break(s), "
                f"fullgraph: {r['fullgraph']}"
            )
            for reason in r["break_reasons"]:
                print(f"    break: {reason}")
            for message in r["warnings"]:
                print(f"    warning: {message}")
    return rows


if __name__ == "__main__":
    main()
