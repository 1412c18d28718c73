"""Step time of the time-to-quality GPT: what the sampled matmul's gather and AdamW's kernels cost.

Trains ``tools/byte_gpt.py``'s GPT (``docs/time-to-quality.md``'s model) exactly and at a
budget, in one process, interleaved round by round, and quotes each variant's median step
time and its median paired speedup over exact with PyTorch's default AdamW. Three switches
are compared, each against the rest held fixed:

- ``index_select``: the sampled matmul's gather as plain ``index_select`` along the last
  dim of the 4-D attention tensors, as before ``approxcompile.ops.sampled.select`` took a
  2-D view for it;
- ``AdamW fused``: ``torch.optim.AdamW(..., fused=True)`` against the default kernels, which
  take ``sqrt`` of second-moment state that stays exactly zero where columns were never kept;
- ``dense backward``: the sampled linear's backward over every output column, as before it
  left out the columns whose gradient is all zero (``approxcompile.ops.live.live_columns``).

    .venv/bin/python tools/bench_byte_gpt.py --budget 0.2
    .venv/bin/python tools/bench_byte_gpt.py --quick      # seconds: a smoke test
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from byte_gpt import ByteGPT

import approxcompile
import approxcompile.ops.sampled as sampled
from approxcompile.errors import PlanWarning
from approxcompile.ops import kernels


def _index_select(t: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    return t.index_select(dim, index)


def _no_live_columns(dy: torch.Tensor) -> torch.Tensor | None:
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=12, help="timed rounds; the first 2 are warm-up")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.d, args.layers, args.heads, args.seq, args.batch, args.rounds = 64, 2, 2, 16, 2, 3
        args.budget = max(args.budget, 0.6)  # the tiny model's exact head alone is a third of its FLOPs
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ByteGPT(d=args.d, layers=args.layers, heads=args.heads, seq=args.seq)
    x = torch.randint(0, 256, (args.batch, args.seq))
    y = torch.randint(0, 256, (args.batch, args.seq))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PlanWarning)  # the plan's own warnings are not this tool's subject
        fast = approxcompile.optimize(copy.deepcopy(model), args.budget, example_inputs=(x,))
    b, gather = f"{args.budget:g}", sampled.select
    live = kernels.live_columns
    variants = {  # name: (module, AdamW's fused flag, the sampled matmul's gather, live columns)
        "exact, AdamW default": (copy.deepcopy(model), None, gather, live),
        "exact, AdamW fused": (copy.deepcopy(model), True, gather, live),
        f"{b}, index_select, AdamW default": (copy.deepcopy(fast), None, _index_select, live),
        f"{b}, 2-D gather, AdamW default": (copy.deepcopy(fast), None, gather, live),
        f"{b}, 2-D gather, AdamW fused": (copy.deepcopy(fast), True, gather, live),
        f"{b}, 2-D gather, fused, dense backward": (copy.deepcopy(fast), True, gather, _no_live_columns),
    }
    opts = {k: torch.optim.AdamW(v[0].parameters(), lr=1e-3, fused=v[1]) for k, v in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    try:
        for _ in range(args.rounds):
            for k, (module, _, select, find_live) in variants.items():
                sampled.select, kernels.live_columns = select, find_live
                t = time.perf_counter()
                loss = F.cross_entropy(module(x).flatten(0, 1), y.flatten())
                opts[k].zero_grad(set_to_none=True)
                loss.backward()
                opts[k].step()
                times[k].append(time.perf_counter() - t)
    finally:
        sampled.select, kernels.live_columns = gather, live
    skip = min(2, args.rounds - 1)
    base = times["exact, AdamW default"][skip:]
    for k, ts in times.items():
        ratio = statistics.median(a / t for a, t in zip(base, ts[skip:], strict=True))
        ms = statistics.median(ts[skip:]) * 1e3
        print(f"{k:40s} {ms:8.1f} ms  {ratio:5.2f}x over exact, default AdamW")
    return 0


if __name__ == "__main__":
    sys.exit(main())
