"""Rerun the CNN's budget-0.4 and 0.6 cells of the replication grid with the current allocation.

The grid in docs/results.md ran before the allocation pass (then in passes/select.py) learned
to spend the budget the hull walk leaves over; this reruns top-k with the cost-model allocation and with the
single keep ratio (3 seeds, 1 epoch, full MNIST, one torch thread) into
``docs/replicate-rerun/`` and prints paired differences against the grid's exact runs.

    .venv/bin/python tools/replicate_rerun.py 0 & .venv/bin/python tools/replicate_rerun.py 1; wait
    .venv/bin/python tools/replicate_rerun.py --summary      # from the repository root
"""

from __future__ import annotations

import json
import statistics as st
import sys
from pathlib import Path

import replicate as R
import torch
from image_data import load_mnist

CACHE = Path("docs/replicate-rerun")
BUDGETS = (0.4, 0.6)


def jobs() -> list[R.Job]:
    return [
        R.Job(model="cnn", variant=v, budget=b, seed=s, epochs=1)
        for b in BUDGETS
        for s in range(3)
        for v in ("topk", R.RATIO)
    ]


def summary() -> None:
    new = {p.stem: json.loads(p.read_text()) for p in CACHE.glob("*.json")}
    exact = {s: json.loads(Path(f"docs/replicate-runs/cnn_exact_b1_s{s}.json").read_text()) for s in range(3)}
    for b in BUDGETS:
        runs = {v: [new[f"cnn_{v}_b{b:g}_s{s}"] for s in range(3)] for v in ("topk", R.RATIO)}
        for v, rs in runs.items():
            d = [100 * (r["test_accuracy"] - exact[r["seed"]]["test_accuracy"]) for r in rs]
            acc = st.mean(100 * r["test_accuracy"] for r in rs)
            fr = st.mean(r["planned_fraction"] for r in rs)
            delta = f"{st.mean(d):+.2f} ± {st.stdev(d):.2f}"
            print(f"budget {b}: {v}: {acc:.2f}%  vs exact {delta}  planned {fr:.3f}")
        pd = [100 * (a["test_accuracy"] - r["test_accuracy"]) for a, r in zip(*runs.values(), strict=True)]
        print(f"budget {b}: allocation - single ratio {st.mean(pd):+.2f} ± {st.stdev(pd):.2f}")


def main() -> None:
    if sys.argv[1:] == ["--summary"]:
        summary()
        return
    torch.set_num_threads(1)
    part = int(sys.argv[1]) if len(sys.argv) > 1 else None
    split = load_mnist()
    for i, job in enumerate(jobs()):
        if (part is not None and i % 2 != part) or (CACHE / f"{job.key}.json").exists():
            continue
        R.save(CACHE, job.key, R.run(job, split))


if __name__ == "__main__":
    main()
