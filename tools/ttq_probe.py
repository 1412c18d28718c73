"""Loss-only probes of time-to-quality recipes: ``tools/time_to_quality.py`` without its exact recipe.

Choosing a recipe costs runs; exact's runs are the dearest part of them and, given the seed,
bit-identical every time on one machine (same initial weights, batches and arithmetic; only
the wall-clock changes). Another machine can round differently (exact's seed-0 loss was 2.1936 on
one session's machine and 2.199 on the next one's), so take ``--exact`` from a run on the
machine the probe runs on. This trains only the recipes, with the same arguments and the same
per-seed training loop as ``time_to_quality.py``, and prints each recipe's validation loss at
``--steps`` (exact's step count) and at its own end, against exact's final loss given by
``--exact``. No wall-clock is compared here: without exact in the same process there is
nothing to compare it with.

    .venv/bin/python tools/ttq_probe.py --d 384 --layers 4 --heads 6 --steps 300 --eval-every 50 \\
        --recipes anneal@0.2/0.5 --seed-list 0,2 --exact 2.1985,2.2186,2.2129
"""

from __future__ import annotations

import argparse
import json
import sys

import time_to_quality as ttq
import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed-list", default="0,1,2", help="seeds to train, comma-separated")
    p.add_argument("--exact", required=True, help="exact's final val loss for seeds 0, 1, ...")
    own, rest = p.parse_known_args(argv)
    args = ttq.parse(rest)
    exact = [float(v) for v in own.exact.split(",")]
    seeds = [int(s) for s in own.seed_list.split(",")]
    if max(seeds) >= len(exact):
        raise SystemExit(f"--exact gives {len(exact)} losses; seed {max(seeds)} needs one")
    torch.set_num_threads(args.threads)
    corpus = ttq.text_data.load_stdlib(limit=args.corpus_limit)
    for seed in seeds:
        for name, run in ttq.train_seed(seed, corpus, args, exact=False)["runs"].items():
            at_steps = ttq.loss_at_step(run["curve"], args.steps)
            final = run["curve"][-1]["val_loss"]
            row = {
                "seed": seed, "recipe": name, "loss_at_exact_steps": round(at_steps, 4),
                "vs_exact_equal_steps_pct": round(100 * (at_steps / exact[seed] - 1), 2),
                "final_loss": round(final, 4), "reaches_exact_final": final <= exact[seed],
            }  # fmt: skip
            print("PROBE", json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
