"""Wall time of ``export_training`` on the benchmark models, total and by phase.

    .venv/bin/python tools/bench_export.py                          # full sizes, median of 3
    .venv/bin/python tools/bench_export.py --size quick --repeats 1 # smoke run

Each model (tools/bench_models.py) is optimized once at the budget, then exported
``--repeats`` times into fresh directories. The phases are timed by wrapping the functions
``approxcompile.export.artifacts`` calls (whichever of them exist in this version): the fx
lowering, each ``torch.onnx`` export, each ``generate_artifacts`` run and the eval-model
build. The table quotes medians; the machine is shared, so say its load with the figures.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_models import build  # tools/ is on sys.path when this runs as a script

import approxcompile
from approxcompile.export import artifacts as art_module
from approxcompile.export import export_training

# Functions export_training reaches through the artifacts module's namespace, by phase name.
PHASES = {
    "lower_for_export": "lower",
    "export_lowered": "torch.onnx export",
    "export_split": "torch.onnx export (once) + split",
    "_generate": "generate_artifacts",
    "eval_model": "eval model build",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mlp", "cnn", "transformer"])
    p.add_argument("--size", choices=["full", "quick"], default="full")
    p.add_argument("--budget", type=float, default=0.4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def _instrument(times: dict[str, list[float]]) -> Callable[[], None]:
    """Wrap every phase function present; returns the undo."""
    saved: dict[str, Any] = {}
    for name, phase in PHASES.items():
        fn = getattr(art_module, name, None)
        if fn is None:
            continue
        saved[name] = fn

        def timed(*args: Any, _fn: Any = fn, _phase: str = phase, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                times[_phase].append(time.perf_counter() - start)

        setattr(art_module, name, functools.wraps(fn)(timed))

    def undo() -> None:
        for name, fn in saved.items():
            setattr(art_module, name, fn)

    return undo


def bench(name: str, size: str, budget: float, repeats: int) -> dict[str, Any]:
    work = build(name, size=size)  # type: ignore[arg-type]
    config = approxcompile.ApproxConfig(measure_time=False)
    fast = approxcompile.optimize(work.model, budget, example_inputs=(work.x,), config=config, progress=False)
    totals: list[float] = []
    phases: dict[str, list[float]] = defaultdict(list)
    runs: list[dict[str, float]] = []
    for _ in range(repeats):
        times: dict[str, list[float]] = defaultdict(list)
        undo = _instrument(times)
        try:
            with tempfile.TemporaryDirectory() as out:
                start = time.perf_counter()
                export_training(fast, (work.x,), out, optimizer="sgd")
                totals.append(time.perf_counter() - start)
        finally:
            undo()
        run = {phase: sum(v) for phase, v in times.items()}
        counts = {f"{phase} calls": float(len(v)) for phase, v in times.items()}
        runs.append({**run, **counts})
        for phase, v in run.items():
            phases[phase].append(v)
    return {
        "model": name,
        "size": size,
        "total_s": statistics.median(totals),
        "totals": totals,
        "phases_s": {k: statistics.median(v) for k, v in phases.items()},
        "calls": {k: v for k, v in runs[-1].items() if k.endswith("calls")},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    load = os.getloadavg()
    results = [bench(m, args.size, args.budget, args.repeats) for m in args.models]
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; repeats {args.repeats}")
    print(f"{'model':<12} {'total s':>8}  phases (median s; calls per export)")
    for r in results:
        detail = ", ".join(
            f"{k} {v:.2f} x{int(r['calls'][k + ' calls'])}" for k, v in sorted(r["phases_s"].items())
        )
        print(f"{r['model']:<12} {r['total_s']:>8.2f}  {detail}")
    if args.json:
        args.json.write_text(json.dumps({"load": load, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
