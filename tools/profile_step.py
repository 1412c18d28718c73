"""Where the time of one training step goes: torch.profiler's top operators, exact vs approxcompile.

The companion of tools/bench.py for docs/performance.md: it trains the same benchmark
model (tools/bench_models.py) with the same step (SGD with momentum, set_to_none
zero_grad), warms up, profiles a few steps and prints the operators with the most self
CPU time per step, grouped by input shape, for the exact model and for
``approxcompile.optimize(model, budget)``, or for the variants ``--variants`` names (any
of tools/bench.py's, e.g. ``pinned@0.4`` and ``paper-pinned@0.4``).

    .venv/bin/python tools/profile_step.py mlp --budget 0.4
    .venv/bin/python tools/profile_step.py cnn --budget 0.4 --steps 5 --rows 15
    .venv/bin/python tools/profile_step.py gpt2 --budget 0.4 --threads 1 --by-op --rows 25
    .venv/bin/python tools/profile_step.py cnn --variants exact,pinned@0.4,paper-pinned@0.4 --threads 1

``--by-op`` sums each operator over all its input shapes (what a comparison of two steps
op by op needs: the sampled step has the same operator at many shapes).
"""

from __future__ import annotations

import argparse
import copy

import torch
from bench import make_optimizer, make_variant, train_step
from bench_models import FACTORIES, build
from torch.profiler import ProfilerActivity, profile

import approxcompile


def profile_variant(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, rows: int, by_op: bool = False
) -> str:
    opt = make_optimizer(model)
    for _ in range(3):
        train_step(model, opt, x, y)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            train_step(model, opt, x, y)
    events = prof.key_averages(group_by_input_shape=not by_op)
    events = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    total_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    lines = [f"{total_ms:8.1f} ms per step in all operators (self time; profiler overhead included)"]
    lines.append(f"{'ms/step':>8}  {'calls':>5}  operator  input shapes")
    for e in events[:rows]:
        shapes = "" if by_op else str(e.input_shapes)[:90]
        lines.append(f"{e.self_cpu_time_total / 1e3 / steps:8.2f}  {e.count // steps:5d}  {e.key}  {shapes}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=sorted(FACTORIES))
    p.add_argument("--budget", type=float, default=0.4)
    p.add_argument("--steps", type=int, default=5, help="profiled steps (after 3 warm-up steps)")
    p.add_argument("--rows", type=int, default=12, help="operators to show")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--by-op", action="store_true", help="one row per operator, all input shapes summed")
    p.add_argument("--variants", type=lambda s: s.split(","), help="tools/bench.py variant names")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    w = build(args.model, "full", seed=0)
    if args.variants:
        cache: dict[float, torch.fx.GraphModule] = {}
        models = [(name, make_variant(w, name, cache).model) for name in args.variants]
    else:
        fast = approxcompile.optimize(copy.deepcopy(w.model), args.budget, example_inputs=(w.x,))
        models = [("exact", w.model), (f"approx@{args.budget}", fast)]
    for name, model in models:
        print(f"== {args.model} {name}, {torch.get_num_threads()} threads")
        print(profile_variant(model, w.x, w.y, args.steps, args.rows, args.by_op), flush=True)


if __name__ == "__main__":
    main()
