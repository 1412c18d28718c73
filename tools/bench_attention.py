"""Training step time with ``ApproxConfig(attention="decomposed")`` against the default (sdpa exact).

Three variants of one model from tools/bench_models.py (default: the GPT-2 row, whose
attention is ``scaled_dot_product_attention``), each from the same initial weights on the same
fixed batch, full steps (zero_grad, forward, cross-entropy, backward, SGD step):

- ``exact``: the model as written;
- ``approx@B``: ``approxcompile.optimize(model, B)`` with the default ``attention="exact"``;
- ``approx@B+attn``: the same with ``attention="decomposed"``.

Timing as in tools/bench.py: a warm-up step each, then in each round every variant runs
``--steps`` steps in turn (the first variant rotates), each block timed with
``time.perf_counter``; medians per step, ratios from the medians. FLOPs: ``FlopCounterMode`` on
one training step of each variant, as a fraction of exact. ``uptime``'s load is printed first.

    .venv/bin/python tools/bench_attention.py --threads 1                # GPT-2 row, budget 0.4
    .venv/bin/python tools/bench_attention.py --size quick --rounds 2    # a smoke test
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F
from bench_models import build
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import approxcompile
from approxcompile import ApproxConfig
from approxcompile.passes.flops import FLOP_FIXES
from approxcompile.plan import META_KEY


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    with FlopCounterMode(display=False, custom_mapping=FLOP_FIXES) as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2")
    p.add_argument("--size", default="full", choices=("full", "quick"))
    p.add_argument("--budget", type=float, default=0.4)
    p.add_argument("--mode", default="forward", choices=("forward", "backward"))
    p.add_argument("--method", default=None, help="default: topk (forward), bernoulli (backward)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1/5/15 min)")
    w = build(args.model, size=args.size, seed=0)
    method = args.method or ("topk" if args.mode == "forward" else "bernoulli")
    variants: dict[str, nn.Module] = {"exact": copy.deepcopy(w.model).train()}
    for label, attention in (
        (f"approx@{args.budget:g}", "exact"),
        (f"approx@{args.budget:g}+attn", "decomposed"),
    ):
        cfg = ApproxConfig(attention=attention, mode=args.mode, method=method)
        start = time.perf_counter()
        fast = approxcompile.optimize(copy.deepcopy(w.model), args.budget, example_inputs=(w.x,), config=cfg)
        plan = fast.meta[META_KEY]
        sampled = [n for n in plan.nodes if n.kind == "attention" and n.sampled]
        keeps = sorted({round(n.keep, 3) for n in sampled})
        print(
            f"{label}: optimize {time.perf_counter() - start:.1f} s, plan fraction {plan.fraction:.3f}, "
            f"{len(sampled)} attention node(s) sampled (keep {keeps})"
        )
        variants[label] = fast.train()
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in variants.items()}
    dense = _flops(variants["exact"], w.x, w.y)
    fractions = {k: _flops(m, w.x, w.y) / dense for k, m in variants.items()}
    for k, m in variants.items():  # warm-up
        _step(m, opts[k], w.x, w.y)
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(args.rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            for _ in range(args.steps):
                _step(variants[k], opts[k], w.x, w.y)
            times[k].append((time.perf_counter() - start) / args.steps)
    exact = statistics.median(times["exact"])
    print(
        f"\n{args.model} ({args.size}), mode={args.mode}, method={method}, {args.rounds}x{args.steps} steps"
    )
    print("| variant | median step (ms) | speedup vs exact | measured FLOP fraction |")
    print("|---|---|---|---|")
    for k in names:
        med = statistics.median(times[k])
        print(f"| {k} | {med * 1e3:.1f} | {exact / med:.2f}x | {fractions[k]:.3f} |")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
