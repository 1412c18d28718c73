"""ONNX Runtime training step time: exact graph vs the approxcompile graph at a budget.

    nice -n 19 .venv/bin/python tools/bench_ort.py --threads 1                   # full sizes
    .venv/bin/python tools/bench_ort.py --size quick --steps 5 --warmup 1        # smoke run

For each model of the speed benchmark (tools/bench_models.py) this exports two sets of ORT
training artifacts from the same initial weights -- ``optimize(budget=1.0)`` (nothing sampled)
and ``optimize(budget=0.4)`` (top-k) -- and times ``OrtTrainer.step`` (forward, ORT-built
backward, SGD update) on the workload's fixed batch. Variants alternate step by step, so a
neighbour's load hits both alike; the table quotes medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_models import build  # tools/ is on sys.path when this runs as a script

import approxcompile
from approxcompile.export import OrtTrainer, export_training


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn", "transformer"])
    p.add_argument("--size", choices=["full", "quick"], default="full")
    p.add_argument("--budget", type=float, default=0.4)
    p.add_argument("--method", default="topk")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return p.parse_args(argv)


def bench_model(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    w = build(name, size=args.size)
    trainers: dict[str, OrtTrainer] = {}
    sampled = 0
    for label, budget in (("exact", 1.0), (f"budget={args.budget}", args.budget)):
        torch.manual_seed(0)
        gm = approxcompile.optimize(w.model, budget, example_inputs=(w.x,), method=args.method)
        if budget < 1.0:
            sampled = len(approxcompile.report(gm).sampled)
        art = export_training(gm, (w.x,), workdir / f"{name}-{label}", optimizer="sgd")
        trainers[label] = OrtTrainer(art, lr=args.lr, threads=args.threads, seed=0)
    times: dict[str, list[float]] = {label: [] for label in trainers}
    for i in range(args.warmup + args.steps):
        for label, trainer in trainers.items():  # alternate: load spikes hit both variants
            start = time.perf_counter()
            trainer.step(w.x, w.y)
            if i >= args.warmup:
                times[label].append(time.perf_counter() - start)
    exact, approx = (statistics.median(t) * 1e3 for t in times.values())
    return {
        "model": w.describe(),
        "sampled_nodes": sampled,
        "exact_ms": exact,
        "approx_ms": approx,
        "speedup": exact / approx,
        "steps": args.steps,
    }


def machine(args: argparse.Namespace) -> str:
    import onnxruntime

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"onnxruntime-training {onnxruntime.__version__}, torch {torch.__version__}, "
        f"ORT threads {args.threads or 'default'}, load average {load:.1f} at start"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    host = machine(args)  # the load average before this run adds its own
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_ort_") as tmp:
        for name in args.models:
            rows.append(bench_model(name, args, Path(tmp)))
            for d in list(Path(tmp).iterdir()):  # full-size artifacts are hundreds of MB each
                shutil.rmtree(d)
    print(f"machine: {host}")
    print(f"| model | sampled nodes | exact ms/step | budget={args.budget} ms/step | speedup |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['sampled_nodes']} | {r['exact_ms']:.1f} | {r['approx_ms']:.1f} "
            f"| {r['speedup']:.2f}x |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": host, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
