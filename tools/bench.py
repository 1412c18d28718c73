"""Wall-clock benchmark of whole training steps: exact vs paper-style sampling vs approxcompile (issue 3).

For each model (tools/bench_models.py) every variant starts from the same initial
weights and trains on the same fixed batch with full steps (zero_grad, forward,
cross-entropy, backward, SGD(lr=0.01, momentum=0.9).step()):

- ``exact``: the model as written;
- ``paper@0.4``: the plain index_select + dense-op implementation (tools/paper_style.py)
  on the layers and keep ratios approxcompile's budget-0.4 plan chose;
- ``approx@B``: ``approxcompile.optimize(model, B, example_inputs=(x,))`` for each budget;
- ``pinned@R``: every node approx@R's plan could sample (sampled, or left exact only because
  the budget was met without it or it measured no faster), each pinned to keep ratio R with top-k
  (``NodeOverride(keep=R, method="topk")``, so no rounding of the kept count to a multiple of
  8), the rest exact; ``paper-pinned@R``: the paper-style implementation of that same plan.
  The pair compares the two implementations of one approximation, kernel for kernel;
- a suffix ``+compile`` (``torch.compile(model, fullgraph=True)``, optimizer step eager;
  ``+compile_breaks`` without ``fullgraph``) and/or
  ``+bf16`` / ``+fp16`` (each step under ``torch.autocast`` with that dtype) on any of them,
  e.g. ``approx@0.4+compile``; ``+cl`` trains the model and its input in channels-last
  memory format (``model.to(memory_format=torch.channels_last)``, the input converted each
  step), as PyTorch recommends for CNNs on a CPU; ``--compile`` / ``--autocast bf16`` add those variants, and
  ``--variants`` names the exact list. Ratios to ``exact`` also come as ratios to the exact
  variant with the same suffix (``vs base``: compiled sampled over compiled exact).

Timing: each variant is warmed up, then in each of ROUNDS rounds every variant runs STEPS
steps in turn (the starting variant rotates each round), so load from other processes on
a shared machine hits all variants alike; each block is timed with ``time.perf_counter``.
The table quotes the median per-step time of each variant, and each speedup as the median over
rounds of the paired ratio (the base's block time over the variant's in the same round): when
the load changes between rounds, the ratio of two separate medians can pick steps from quiet
rounds for one variant and from busy ones for the other, the paired ratio cannot.

FLOPs: ``FlopCounterMode`` on one forward + backward of each variant, as a fraction of exact.

Peak memory (CPU): each variant is built again in a fresh process (``optimize`` included;
what its measurements left in the sampled ops' workspace is dropped) and trains its first
few steps; the process reports ``ru_maxrss`` (its peak RSS) minus its RSS right before the
first step, i.e. what training adds on top of the built model, as a user sees it:
gradients, momentum buffers, activations saved for backward, the workspace, temporaries,
allocator slack and the library code the first step pages in. Two details keep
``ru_maxrss`` honest: Linux carries a parent's peak RSS
across ``exec`` into the child's ``ru_maxrss``, so the child is started through a tiny
trampoline process whose own peak is small; and the child resets its high-water mark
(``/proc/self/clear_refs``) before the measured steps, so ``optimize``'s own transient
memory does not count (where that reset is unavailable, JSON ``peak_reset`` is false and the
figure can include it). On CUDA, peak memory is ``torch.cuda.max_memory_allocated`` above
the allocation after building, in-process.

Threads: on a machine shared with other busy processes, more torch threads than free
cores makes every parallel region wait for a descheduled thread (a 2-core machine with one
busy neighbour measured 200 ms for a 2 ms step at 2 threads); pass ``--threads 1`` there.

    .venv/bin/python tools/bench.py                      # everything, full size (long)
    .venv/bin/python tools/bench.py --models mlp --budgets 0.4 --rounds 3
    .venv/bin/python tools/bench.py --quick --markdown   # tiny sizes, a smoke test
    .venv/bin/python tools/bench.py --models mlp,cnn --budgets 0.4 --compile --autocast bf16
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from bench_models import FACTORIES, Workload, build
from paper_style import paper_style
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import approxcompile
from approxcompile.ops.workspace import WORKSPACE
from approxcompile.passes import CAPTURE_KEY
from approxcompile.plan import META_KEY, Plan

# Starts the memory child from a small process: ru_maxrss survives exec, so a child exec'd
# straight from this (large) process would report this process's peak.
_TRAMPOLINE = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


@dataclass
class Variant:
    """One way of training the model, and everything measured about it."""

    name: str
    model: nn.Module
    info: dict[str, Any]
    optimizer: torch.optim.Optimizer = field(init=False)
    step_s: list[float] = field(default_factory=list)  # per-step seconds, one entry per round
    flops: int = 0
    memory: dict[str, Any] = field(default_factory=dict)
    autocast: torch.dtype | None = None  # each step runs under torch.autocast(dtype=...)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.step_s) * 1e3

    def speedup_over(self, base: Variant) -> float:
        """Median over rounds of ``base``'s step time over this variant's, round by round."""
        return statistics.median(b / s for b, s in zip(base.step_s, self.step_s, strict=True))


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    autocast: torch.dtype | None = None,
) -> None:
    """One full training step; ``zero_grad`` frees the gradients (set_to_none), PyTorch's default.

    With ``autocast`` the forward and the loss run under ``torch.autocast`` (backward outside
    it, as PyTorch's AMP recipe does).
    """
    opt.zero_grad()
    with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _plan_info(plan: Plan, gm: fx.GraphModule) -> dict[str, Any]:
    capture = gm.meta.get(CAPTURE_KEY)
    return {
        "frontend": plan.frontend,
        "frontend_reason": plan.frontend_reason,
        "capture_s": capture.seconds if capture is not None else None,
        "optimize_s": gm.meta.get("bench_optimize_s"),
        "budget": plan.budget,
        "planned_fraction": plan.fraction,
        "counted_fraction": plan.counted_flops / plan.dense_flops if plan.dense_flops else 1.0,
        "sampled": {n.name: {"keep": n.keep, "k": n.k, "inner": n.inner} for n in plan.nodes if n.sampled},
        "exact": {n.name: n.reason for n in plan.nodes if not n.sampled},
    }


def label(kind: str, budget: float) -> str:
    """``approx@0.4``: ``repr`` round-trips, so a memory process parses back the exact budget."""
    return f"{kind}@{float(budget)!r}"


def make_variant(
    w: Workload, name: str, optimized: dict[float, fx.GraphModule], measure_time: bool = False
) -> Variant:
    """``exact``, ``paper@B``, ``approx@B``, ``pinned@R`` or ``paper-pinned@R``, from a copy of ``w.model``.

    ``optimized`` caches ``optimize`` results by budget (``pinned@R`` under ``-R``), so
    paper@B reuses approx@B's plan; ``optimize`` shares parameters with its input, hence the
    copy before it.
    """
    base, *suffixes = name.split("+")
    v = _base_variant(w, base, optimized, measure_time)
    v.name = name
    for suffix in suffixes:
        if suffix in ("compile", "compile_breaks"):
            # fullgraph: a graph break anywhere in the sampled ops is an error, not a slowdown;
            # compile_breaks lets Dynamo split the graph instead (how ops without a graph compile).
            full = suffix == "compile"
            v.model = torch.compile(v.model, fullgraph=full)  # type: ignore[assignment]
        elif suffix in AUTOCAST:
            v.autocast = AUTOCAST[suffix]
        elif suffix == "cl":
            v.model = ChannelsLast(v.model)
        else:
            raise ValueError(f"unknown variant suffix {suffix!r} in {name!r}")
    return v


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class ChannelsLast(nn.Module):
    """``model`` with its 4-D parameters and its input in channels-last memory format (``+cl``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)


def _base_variant(
    w: Workload, name: str, optimized: dict[float, fx.GraphModule], measure_time: bool
) -> Variant:
    kind, _, budget = name.partition("@")
    if kind == "exact":
        return Variant(name, copy.deepcopy(w.model), {})
    b = float(budget)
    if kind in ("pinned", "paper-pinned"):
        key = -b  # budgets are positive: negative keys hold the pinned plans
        if key not in optimized:
            optimized[key] = pinned_model(w, b, _optimized(w, b, optimized, measure_time))
        gm = optimized[key]
    else:
        gm = _optimized(w, b, optimized, measure_time)
    plan = gm.meta[META_KEY]
    if kind in ("paper", "paper-pinned"):
        paper = paper_style(w.model, plan)
        return Variant(
            name, paper.model, {"plan_budget": b, "sampled": paper.sampled, "left_exact": paper.left_exact}
        )
    if kind in ("approx", "pinned"):
        # approx@B and approx@B+cl / +compile train their own copies: +cl converts the
        # parameters in place, which would change the layout the plain variant trains in.
        if gm.meta.get("bench_handed_out"):
            gm = copy.deepcopy(gm)
        gm.meta["bench_handed_out"] = True
        return Variant(name, gm, _plan_info(plan, gm))
    raise ValueError(f"unknown variant {name!r}")


def _optimized(
    w: Workload, b: float, optimized: dict[float, fx.GraphModule], measure_time: bool
) -> fx.GraphModule:
    """``optimize(model, b)`` once per budget (cached in ``optimized``)."""
    if b not in optimized:
        config = approxcompile.ApproxConfig(measure_time=measure_time)
        start = time.perf_counter()
        optimized[b] = approxcompile.optimize(copy.deepcopy(w.model), b, example_inputs=(w.x,), config=config)
        optimized[b].meta["bench_optimize_s"] = time.perf_counter() - start
    return optimized[b]


# passes/allocation.py's reasons for leaving a candidate node exact
_ALLOCATION_REASONS = ("budget is met without sampling", "sampling measured no faster")


def pinned_model(w: Workload, keep: float, planned: fx.GraphModule) -> fx.GraphModule:
    """``w.model`` with every node ``planned`` could sample pinned to ``keep`` with top-k, the rest exact.

    A node could be sampled when the plan samples it or left it exact for a reason of the
    allocation (``_ALLOCATION_REASONS``), not of the exclusions (first / last node, too few
    channels, an override).

    Budget 1.0: the pinned nodes are fixed by their overrides, and the allocation then has
    no reason to sample any other node.
    """
    config = approxcompile.ApproxConfig()
    nodes = planned.meta[META_KEY].nodes
    sampled = [n.name for n in nodes if n.sampled or (n.reason or "").startswith(_ALLOCATION_REASONS)]
    if not sampled:
        raise ValueError(f"pinned@{keep}: the budget-{keep} plan samples no node of {w.name}")
    for name in sampled:
        config = config.set_module_name(name, approxcompile.NodeOverride(keep=keep, method="topk"))
    start = time.perf_counter()
    gm = approxcompile.optimize(copy.deepcopy(w.model), 1.0, example_inputs=(w.x,), config=config)
    gm.meta["bench_optimize_s"] = time.perf_counter() - start
    return gm


def variant_names(args: argparse.Namespace, model: str = "") -> list[str]:
    """``gpt2`` has no paper-style variant: that implementation swaps ``nn.Linear`` modules, and
    GPT-2's projections are ``Conv1D`` modules."""
    if args.variants:
        return args.variants
    paper = [] if model == "gpt2" else [label("paper", args.paper_budget)]
    names = ["exact", *paper, *(label("approx", b) for b in args.budgets)]
    names += [label(kind, r) for r in args.pinned for kind in ("pinned", "paper-pinned")]
    plain = ["exact", *(label("approx", b) for b in args.budgets)]
    if args.compile:
        names += [n + "+compile" for n in plain]
    if args.autocast:
        names += [n + "+" + args.autocast for n in plain]
    return names


def build_variants(
    w: Workload, names: list[str], device: torch.device, measure_time: bool = False
) -> list[Variant]:
    """Every variant, each with its own SGD optimizer, in train mode on ``device``."""
    optimized: dict[float, fx.GraphModule] = {}
    bar = tqdm(names, desc=f"{w.name}: build", leave=False)
    variants = [make_variant(w, n, optimized, measure_time) for n in bar]
    for v in variants:
        v.model.to(device).train()
        v.optimizer = make_optimizer(v.model)  # after .to(), which may replace the parameters
    return variants


def training_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one forward + backward as FlopCounterMode counts them; gradients are dropped after.

    A compiled model is counted through its original module (the same products).
    """
    model = getattr(model, "_orig_mod", model)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def time_variants(
    variants: list[Variant], x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace
) -> None:
    """Warm up each variant, then time ROUNDS rounds of STEPS steps per variant, variants interleaved."""
    device = x.device
    for v in tqdm(variants, desc="warmup", leave=False):
        torch.manual_seed(args.seed)  # the random sampling methods draw the same stream in every variant
        for _ in range(args.warmup):
            train_step(v.model, v.optimizer, x, y, v.autocast)
    _sync(device)
    with tqdm(total=args.rounds * len(variants), desc="timing", unit="block", leave=False) as bar:
        for r in range(args.rounds):
            shift = r % len(variants)
            for v in variants[shift:] + variants[:shift]:
                start = time.perf_counter()
                for _ in range(args.steps):
                    train_step(v.model, v.optimizer, x, y, v.autocast)
                _sync(device)
                v.step_s.append((time.perf_counter() - start) / args.steps)
                bar.update()


# -- peak memory ---------------------------------------------------------------------------------


def _rss_bytes() -> int | None:
    """Current resident set size, or None where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_freed() -> None:
    """Hand memory freed to glibc's heap back to the OS, so it does not hide later growth."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_child(model: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run in a fresh process: build one variant, train its first steps, report the peak RSS growth.

    As a user sees it: the baseline is the freshly built model (``optimize`` included, its
    transient memory released, and the sampled ops' workspace emptied of what its
    measurements left, so no buffer the steps will use is already in the baseline); the peak
    is over the first ``--memory-steps`` training steps, the very first included.
    """
    w = build(model, args.size, seed=args.seed)
    v = make_variant(w, variant, {}, args.measure_time)
    v.model.train()
    WORKSPACE.clear()
    _release_freed()
    reset = _reset_peak()
    base = _rss_bytes()
    base = _maxrss_bytes() if base is None else base
    start_peak = _maxrss_bytes()
    opt = make_optimizer(v.model)
    for _ in range(args.memory_steps):
        train_step(v.model, opt, w.x, w.y, v.autocast)
    peak = _maxrss_bytes()
    return {
        "peak_mb": (peak - base) / 2**20,
        "maxrss_mb": peak / 2**20,
        "rss_after_build_mb": base / 2**20,
        "maxrss_after_build_mb": start_peak / 2**20,  # well above rss_after_build: the mark was not reset
        "peak_reset": reset,
        "steps": args.memory_steps,
    }


def _run_memory_child(model: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    child = [sys.executable, str(Path(__file__).resolve()), "--memory-child", f"{model}:{variant}"]
    child += [
        "--memory-steps",
        str(args.memory_steps),
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
    ]
    child += ["--quick"] if args.quick else []
    proc = subprocess.run(
        [sys.executable, "-c", _TRAMPOLINE, *child], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_memory(variants: list[Variant], w: Workload, args: argparse.Namespace) -> None:
    """Peak training memory of each variant, each in its own process (CPU) or in-process (CUDA)."""
    if w.x.device.type == "cuda":
        for v in variants:
            _cuda_memory(v, w, args.memory_steps)
        return
    # The processes only measure memory, so they may share the cores.
    with ThreadPoolExecutor(max_workers=max(1, min(4, _usable_cores()))) as pool:
        jobs = pool.map(lambda v: _run_memory_child(w.name, v.name, args), variants)
        for v, mem in zip(variants, tqdm(jobs, total=len(variants), desc="memory", leave=False), strict=True):
            v.memory = mem


def _cuda_memory(v: Variant, w: Workload, steps: int) -> None:
    model = copy.deepcopy(v.model)
    opt = make_optimizer(model)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        train_step(model, opt, w.x, w.y, v.autocast)
    torch.cuda.synchronize()
    v.memory = {"peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20, "steps": steps}
    del model, opt


# -- the run -------------------------------------------------------------------------------------


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Every variant of one model: timings, FLOPs, memory; one row per variant."""
    w = build(name, args.size, seed=args.seed)
    print(w.describe(), flush=True)
    variants = build_variants(w, variant_names(args, name), device, args.measure_time)
    x, y = w.x.to(device), w.y.to(device)
    for v in variants:
        v.flops = training_flops(v.model, x, y)
    time_variants(variants, x, y, args)
    if args.memory_steps > 0:
        measure_memory(variants, Workload(w.name, w.model, x, y), args)
    by_name = {v.name: v for v in variants}
    exact = by_name.get("exact", variants[0])
    paper = next((v for v in variants if v.name.startswith("paper@")), None)
    # pinned@R is compared with paper-pinned@R (the same kept counts), not with paper@B
    pinned_paper = {v.name.removeprefix("paper-"): v for v in variants if v.name.startswith("paper-pinned@")}
    return [
        {
            "model": name,
            "variant": v.name,
            "median_step_ms": v.median_ms,
            "speedup_vs_exact": v.speedup_over(exact),
            "speedup_vs_paper": _vs_paper(v, _paper_of(v.name, pinned_paper, paper)),
            # compiled sampled over compiled exact, bf16 over bf16: the exact twin with this suffix
            "speedup_vs_base": v.speedup_over(by_name.get(_base_of(v.name), exact)),
            "flops": v.flops,
            "flop_fraction": v.flops / exact.flops if exact.flops else float("nan"),
            "peak_mem_mb": v.memory.get("peak_mb"),
            "step_s": v.step_s,
            "memory": v.memory,
            "info": v.info,
        }
        for v in variants
    ]


def _paper_of(name: str, pinned_paper: dict[str, Variant], paper: Variant | None) -> Variant | None:
    """paper-pinned@R with the same suffixes, else eager paper-pinned@R, for pinned@R; else paper@B."""
    name = name.removeprefix("paper-")
    return pinned_paper.get(name) or pinned_paper.get(name.split("+")[0]) or paper


def _vs_paper(v: Variant, paper: Variant | None) -> float:
    return v.speedup_over(paper) if paper is not None else float("nan")


def _base_of(name: str) -> str:
    """``approx@0.4+compile`` -> ``exact+compile``: the exact variant trained the same way."""
    _, plus, suffix = name.partition("+")
    return "exact" + plus + suffix


def machine(device: torch.device) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "usable_cores": _usable_cores(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def format_table(result: dict[str, Any], markdown: bool) -> str:
    """The summary table, as markdown (with the command and machine) or as aligned text."""
    head = ["model", "variant", "median step ms", "vs exact", "vs base", "vs paper", "FLOP fraction"]
    head += ["peak mem MB"]
    body = [
        [
            r["model"],
            r["variant"],
            f"{r['median_step_ms']:.1f}",
            f"{r['speedup_vs_exact']:.2f}x",
            f"{r['speedup_vs_base']:.2f}x",
            "n/a" if r["speedup_vs_paper"] != r["speedup_vs_paper"] else f"{r['speedup_vs_paper']:.2f}x",
            f"{r['flop_fraction']:.3f}",
            "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}",
        ]
        for r in result["rows"]
    ]
    m = result["machine"]
    where = (
        f"{m['platform']}, {m['cpu_count']} cores, torch {m['torch']}, {m['threads']} threads, {m['device']}"
    )
    captures = [
        f"{r['model']} {r['variant']}: captured by {r['info']['frontend']} in {r['info']['capture_s']:.1f} s "
        f"(optimize {r['info']['optimize_s']:.1f} s)"
        for r in result["rows"]
        if r["info"].get("capture_s") is not None
    ]
    if markdown:
        lines = [f"Command: `{result['command']}`", "", f"Machine: {where}", ""]
        lines += [
            "| " + " | ".join(head) + " |",
            "|" + "|".join("---:" if i > 1 else "---" for i in range(len(head))) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines + ([""] + captures if captures else []))
    widths = [max(len(c), *(len(row[i]) for row in body)) for i, c in enumerate(head)]

    def fmt(row: list[str]) -> str:
        return "  ".join(
            c.ljust(wd) if i < 2 else c.rjust(wd) for i, (c, wd) in enumerate(zip(row, widths, strict=True))
        )

    return "\n".join(
        [f"command: {result['command']}", f"machine: {where}", fmt(head), *map(fmt, body), *captures]
    )


def _floats(text: str) -> list[float]:
    return [float(b) for b in text.split(",") if b.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    p.add_argument(
        "--models",
        default="mlp,cnn,transformer",
        help="comma-separated: " + ", ".join(FACTORIES) + " (gpt2 needs the [hf] extra; name it to run it)",
    )
    p.add_argument("--budgets", type=_floats, default=[0.2, 0.4, 0.6, 0.8], help="approxcompile budgets")
    p.add_argument("--paper-budget", type=float, default=0.4, help="the plan paper-style copies")
    p.add_argument(
        "--pinned",
        type=_floats,
        default=[],
        help="keep ratios R: add pinned@R and paper-pinned@R (the plan's nodes pinned to R, top-k)",
    )
    p.add_argument("--steps", type=int, help="training steps per timed block (default 5; quick 2)")
    p.add_argument("--warmup", type=int, help="untimed steps per variant first (default 2; quick 1)")
    p.add_argument(
        "--rounds", type=int, help="timed blocks per variant; the median is quoted (default 5; quick 2)"
    )
    p.add_argument(
        "--memory-steps", type=int, help="steps in each memory process, 0 to skip (default 3; quick 2)"
    )
    p.add_argument(
        "--threads", type=int, default=_usable_cores(), help="torch threads (default: all usable cores)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--compile", action="store_true", help="add torch.compile(fullgraph=True) twins of exact and approx@B"
    )
    p.add_argument(
        "--autocast", choices=sorted(AUTOCAST), help="add twins of exact and approx@B under autocast"
    )
    p.add_argument(
        "--variants",
        type=lambda t: [v.strip() for v in t.split(",") if v.strip()],
        help="exactly these variants, e.g. exact,approx@0.4,exact+compile,approx@0.4+compile",
    )
    p.add_argument(
        "--measure-time",
        action="store_true",
        help="optimize with ApproxConfig(measure_time=True): no node sampled where it measured slower",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick", action="store_true", help="tiny models and few steps: a smoke test, not a measurement"
    )
    p.add_argument("--out", help="JSON results (default docs/bench.json; with --quick docs/bench-quick.json)")
    p.add_argument(
        "--markdown", action="store_true", help="print the table as markdown, with command and machine"
    )
    p.add_argument("--memory-child", help=argparse.SUPPRESS)  # internal: measure one saved variant
    args = p.parse_args(argv)
    quick = args.quick
    for name, full, small in (("steps", 5, 2), ("warmup", 2, 1), ("rounds", 5, 2), ("memory_steps", 3, 2)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    args.size = "quick" if quick else "full"
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in FACTORIES]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(FACTORIES)}")
    ratios = [*args.budgets, *args.pinned, args.paper_budget]
    if not args.budgets or any(not 0 < b <= 1 for b in ratios):
        p.error("budgets must be in (0, 1]")
    if min(args.steps, args.rounds) < 1 or min(args.warmup, args.memory_steps) < 0 or args.threads < 1:
        p.error("--steps and --rounds must be >= 1, --warmup and --memory-steps >= 0, --threads >= 1")
    args.out = args.out or ("docs/bench-quick.json" if quick else "docs/bench.json")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table, write the JSON, and return what was written."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        model, _, variant = args.memory_child.partition(":")
        result = memory_child(model, variant, args)
        print(json.dumps(result))
        return result
    device = torch.device(args.device)
    command = shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__), *argv])
    started = time.time()
    rows: list[dict[str, Any]] = []
    for name in tqdm(args.models, desc="models", unit="model"):
        rows += bench_model(name, args, device)
    result = {
        "command": command,
        "machine": machine(device),
        "settings": {
            k: getattr(args, k) for k in ("size", "budgets", "paper_budget", "pinned", "steps", "warmup")
        }
        | {"variants": variant_names(args)}
        | {k: getattr(args, k) for k in ("rounds", "memory_steps", "seed", "measure_time")},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "elapsed_s": time.time() - started,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print()
    print(format_table(result, args.markdown))
    print(f"\nraw timings: {args.out}")
    return result


if __name__ == "__main__":
    main()
