"""Time to quality: does a sampled GPT reach the exact model's validation loss in less wall-clock time?

A byte-level GPT (``tools/byte_gpt.py``) learns the Python standard library's source
(``tools/text_data.py``: a fixed file split, the same batch order for every recipe of a seed).
Recipes, each from the same initial weights:

- ``exact``: the model as written (plain PyTorch);
- ``constant@B``: ``approxcompile.optimize(model, B)`` throughout;
- ``anneal@B``: budget ``B``, then linear to exact over the last ``--anneal-fraction`` of steps
  (``approxcompile.schedule.Scheduler(..., "anneal_to_exact")``), so it ends exact;
- ``cooldown@B``: budget ``B``, then exact at once for the last ``--anneal-fraction`` of steps
  (``"exact_cooldown"``), where the learning rate has decayed;
- ``adaptive@B``: ``approxcompile.schedule.Adaptive``: every ``--adaptive-every`` steps the error
  curves are measured again on the current batch and the least budget up to ``B`` whose plan
  keeps the mean relative error under ``--adaptive-target`` is chosen.

``KIND@B/F`` in ``--recipes`` sets that recipe's budget and fraction (``cooldown@0.3/0.2``);
``KIND:M`` trains that recipe for ``M`` times exact's steps, its LR and budget
schedules stretched to them: cheaper steps buy more of them, which is how a time-to-quality
comparison lets a faster recipe spend its savings. It reads on past exact's last batch in the
same order, and is evaluated at exact's last step too, so "equal steps" stays a like-for-like
comparison.

The recipes of a seed train in one process, interleaved step by step (the order rotates each
step), so the machine's load falls on all of them alike; the wall-clock of a step is measured
around forward, backward, the optimizer step and the schedule's own work. Validation (eval mode:
exact products) runs at fixed step intervals, outside the timed region. ``optimize`` runs once
per seed and is reported apart (``optimize_s``).

    .venv/bin/python tools/time_to_quality.py                   # docs/time-to-quality.md's run
    .venv/bin/python tools/time_to_quality.py --quick --out /tmp/ttq   # seconds: a smoke test

Writes ``<out>/time_to_quality.json`` (the headline medians), ``<out>/time_to_quality_runs.json``
(every curve) and ``<figures>/ttq-wallclock.png``, ``<figures>/ttq-flops.png``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import text_data
import torch
import torch.nn.functional as F
from byte_gpt import ByteGPT
from torch import nn

import approxcompile
from approxcompile import schedule
from approxcompile.errors import BudgetError


@dataclass
class Run:
    """One recipe of one seed: its module, optimizer and measured curve."""

    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    lr: torch.optim.lr_scheduler.LRScheduler
    control: Callable[[torch.Tensor], float]  # before each step: the budget in force
    dense_flops: int
    steps: int  # this recipe's own step count (its LR and budget schedules span it)
    wall_s: float = 0.0
    flops: float = 0.0
    budgets: list[float] = field(default_factory=list)
    curve: list[dict[str, float]] = field(default_factory=list)  # step, wall_s, flops, val_loss


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--budget", type=float, default=0.4, help="the constant recipe's budget")
    p.add_argument("--anneal-budget", type=float, default=0.2)
    p.add_argument("--anneal-fraction", type=float, default=0.3, help="anneal's and cooldown's default")
    p.add_argument("--adaptive-budget", type=float, default=0.6)
    p.add_argument("--adaptive-target", type=float, default=0.3)
    p.add_argument("--adaptive-every", type=int, default=25)
    p.add_argument("--adaptive-rows", type=int, default=None, help="measure on N sequences of the batch")
    p.add_argument(
        "--recipes",
        default="constant,anneal,adaptive",
        help="besides exact, comma-separated KIND[@BUDGET][/FRACTION][:M]: BUDGET and FRACTION override "
        "the flags' defaults for that recipe; :M trains it for M times --steps steps (its LR and budget "
        "schedules stretched to them), e.g. anneal,cooldown@0.3/0.2:1.1",
    )
    p.add_argument("--measure-time", action="store_true", help="ApproxConfig(measure_time=True)")
    p.add_argument(
        "--min-keep", type=float, default=None,
        help="a floor on every node's keep ratio: ApproxConfig.keep_grid without the ratios below it",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--optimizer", choices=("adamw-fused", "adamw"), default="adamw-fused",
        help="every recipe's optimizer: AdamW(fused=True), or PyTorch's default AdamW kernels",
    )  # fmt: skip
    p.add_argument("--corpus-limit", type=int, default=None, help="bytes per split (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke test")
    p.add_argument("--out", default="docs")
    p.add_argument("--report-only", action="store_true", help="table and plots from <out>'s runs JSON")
    p.add_argument("--figures", default=None, help="default: <out>/figures")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.d, args.layers, args.heads = min(args.seeds, 2), 6, 64, 2, 2
        args.seq, args.batch, args.eval_every, args.eval_batches = 32, 4, 3, 1
        args.adaptive_every, args.corpus_limit = 3, args.corpus_limit or 100_000
    # each recipe's own step count, decided (and checked) once, before any training
    args.recipe_steps = [(r, max(1, round(r.mult * args.steps))) for r in parse_recipes(args.recipes)]
    return args


def lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10%: the same for every recipe."""
    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return 0.1 + 0.9 * (1 + math.cos(math.pi * t)) / 2


@torch.no_grad()
def val_loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    was = model.training
    model.eval()
    loss = sum(float(F.cross_entropy(model(x).flatten(0, 1), y.flatten())) for x, y in batches)
    model.train(was)
    return loss / len(batches)


def feasible(fast: nn.Module, budget: float) -> float:
    """``budget``, or the smallest feasible budget (in 1/100 steps) when the model cannot go that low."""
    try:
        approxcompile.set_budget(copy.deepcopy(fast), budget)
        return budget
    except BudgetError as e:
        return math.ceil((e.smallest_feasible or 1.0) * 100) / 100


@dataclass(frozen=True)
class Recipe:
    """One ``--recipes`` item: ``KIND[@BUDGET][/FRACTION][:MULT]``; unset parts take the flags' defaults."""

    kind: str
    budget: float | None = None
    fraction: float | None = None
    mult: float = 1.0

    def label(self, budget: float, steps: int, exact_steps: int) -> str:
        text = f"{self.kind}@{budget:g}"
        if self.fraction is not None:
            text += f" last {self.fraction:g}"
        return text if steps == exact_steps else f"{text} x{self.mult:g} steps"


def _number(item: str, part: str, what: str, low: float, high: float) -> float:
    try:
        v = float(part)
    except ValueError:
        raise SystemExit(f"bad recipe {item!r}: the {what} must be a number") from None
    if not low < v <= high:
        raise SystemExit(f"bad recipe {item!r}: the {what} must be in ({low:g}, {high:g}]")
    return v


def parse_recipes(text: str) -> list[Recipe]:
    """``"anneal,cooldown@0.3/0.2:1.1"`` -> recipes (kind, budget, fraction of steps, step multiplier)."""
    out = []
    for item in (r.strip() for r in text.split(",")):
        if not item:
            continue
        head, _, mult = item.partition(":")
        head, _, fraction = head.partition("/")
        kind, _, budget = head.partition("@")
        out.append(
            Recipe(
                kind=kind,
                budget=_number(item, budget, "budget after '@'", 0.0, 1.0) if budget else None,
                fraction=_number(item, fraction, "fraction after '/'", 0.0, 1.0) if fraction else None,
                mult=_number(item, mult, "step multiplier after ':'", 0.0, math.inf) if mult else 1.0,
            )
        )
    unknown = sorted({r.kind for r in out} - set(RECIPES))
    if unknown:
        raise SystemExit(f"unknown recipes {unknown}; choose from {', '.join(RECIPES)}")
    return out


RECIPES = ("constant", "anneal", "cooldown", "adaptive")


def make_config(args: argparse.Namespace) -> approxcompile.ApproxConfig:
    default = approxcompile.ApproxConfig().keep_grid
    grid = default if args.min_keep is None else tuple(k for k in default if k >= args.min_keep)
    if not grid:
        raise SystemExit(f"--min-keep {args.min_keep} leaves no keep ratio in {default}")
    return approxcompile.ApproxConfig(measure_time=args.measure_time, keep_grid=grid)


def make_optimizer(module: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    # Fused AdamW by default: the single-tensor and foreach kernels take ``sqrt`` of the
    # second-moment state, which on this CPU is ~15x slower on exact zeros, and a sampled
    # weight's never-kept columns have exactly zero state (docs/performance.md).
    fused = {"adamw-fused": True, "adamw": None}[args.optimizer]
    return torch.optim.AdamW(module.parameters(), lr=args.lr, weight_decay=0.01, fused=fused)


def make_runs(model: nn.Module, fast: nn.Module, args: argparse.Namespace, exact: bool = True) -> list[Run]:
    """The recipes of ``args``, after exact unless ``exact=False`` (``tools/ttq_probe.py``)."""
    dense = fast.meta["approxcompile"].dense_flops

    def run(name: str, module: nn.Module, control: Callable[[torch.Tensor], float], steps: int) -> Run:
        opt = make_optimizer(module, args)
        lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps))
        return Run(name, module, opt, lr, control, dense, steps)

    defaults = {
        "constant": (args.budget, None),
        "anneal": (args.anneal_budget, args.anneal_fraction),
        "cooldown": (args.anneal_budget, args.anneal_fraction),
        "adaptive": (args.adaptive_budget, None),
    }
    runs = [run("exact", copy.deepcopy(model), lambda x: 1.0, args.steps)] if exact else []
    for recipe, steps in args.recipe_steps:
        default_budget, default_fraction = defaults[recipe.kind]
        b = feasible(fast, recipe.budget if recipe.budget is not None else default_budget)
        f = recipe.fraction if recipe.fraction is not None else default_fraction
        module = copy.deepcopy(fast)
        name = recipe.label(b, steps, args.steps)
        if recipe.kind == "constant":
            approxcompile.set_budget(module, b)
            control: Callable[[torch.Tensor], float] = lambda x, b=b: b  # noqa: E731
        elif recipe.kind in ("anneal", "cooldown"):
            named = "anneal_to_exact" if recipe.kind == "anneal" else "exact_cooldown"
            sched = schedule.Scheduler(module, named, steps, b, fraction=f)
            control = lambda x, sched=sched: sched.step()  # noqa: E731
        else:
            adapt = schedule.Adaptive(
                module, budget=b, target=args.adaptive_target, every=args.adaptive_every,
                rows=args.adaptive_rows,
            )  # fmt: skip
            control = lambda x, adapt=adapt: adapt.step(x)  # noqa: E731
        runs.append(run(name, module, control, steps))
    return runs


def train_seed(
    seed: int, corpus: text_data.Corpus, args: argparse.Namespace, exact: bool = True
) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = ByteGPT(d=args.d, layers=args.layers, heads=args.heads, seq=args.seq)
    longest = max([args.steps, *(steps for _, steps in args.recipe_steps)])
    # one batch order for every recipe; a recipe with more steps reads on past exact's last batch
    data = list(text_data.batches(corpus.train, steps=longest, batch=args.batch, seq=args.seq, seed=seed))
    val = text_data.fixed_batches(corpus.val, count=args.eval_batches, batch=args.batch, seq=args.seq)
    config = make_config(args)
    start = time.perf_counter()
    example = (data[0][0],)
    fast = approxcompile.optimize(copy.deepcopy(model), args.budget, example_inputs=example, config=config)
    optimize_s = time.perf_counter() - start
    runs = make_runs(model, fast, args, exact)
    for r in runs:
        r.curve.append({"step": 0, "wall_s": 0.0, "flops": 0.0, "val_loss": val_loss(r.model, val)})
    for step, (x, y) in enumerate(data):
        active = [r for r in runs if step < r.steps]
        for i in range(len(active)):
            r = active[(i + step) % len(active)]  # rotate: no recipe always runs right after another
            t = time.perf_counter()
            budget = r.control(x)
            loss = F.cross_entropy(r.model(x).flatten(0, 1), y.flatten())
            r.opt.zero_grad(set_to_none=True)
            loss.backward()
            r.opt.step()
            r.lr.step()
            r.wall_s += time.perf_counter() - t
            plan = getattr(r.model, "meta", {}).get("approxcompile")
            r.flops += plan.approx_flops if plan is not None else r.dense_flops
            r.budgets.append(budget)
        done = step + 1
        if done % args.eval_every == 0 or any(done in (r.steps, args.steps) for r in active):
            for r in active:
                loss_v = val_loss(r.model, val)
                r.curve.append({"step": step + 1, "wall_s": r.wall_s, "flops": r.flops, "val_loss": loss_v})
        walls = " ".join(f"{r.name}={r.wall_s:.0f}s/{r.curve[-1]['val_loss']:.3f}" for r in active)
        print(f"seed {seed} step {step + 1}/{len(data)}", walls, flush=True)
    return {
        "seed": seed,
        "optimize_s": optimize_s,
        "runs": {
            r.name: {
                "wall_s": r.wall_s,
                "flops": r.flops,
                "steps": r.steps,
                "budgets": sorted(set(r.budgets)),
                "curve": r.curve,
            }
            for r in runs
        },
    }


def time_to(curve: list[dict[str, float]], target: float) -> float | None:
    """Wall-clock at which the validation loss first reaches ``target`` (linear between evaluations)."""
    for a, b in zip(curve, curve[1:], strict=False):
        if b["val_loss"] <= target:
            if a["val_loss"] <= target:
                return a["wall_s"]
            f = (a["val_loss"] - target) / (a["val_loss"] - b["val_loss"])
            return a["wall_s"] + f * (b["wall_s"] - a["wall_s"])
    return None


def loss_at_step(curve: list[dict[str, float]], step: float) -> float:
    """Validation loss evaluated at ``step`` (every recipe is evaluated at exact's last step)."""
    for p in curve:
        if p["step"] == step:
            return p["val_loss"]
    raise ValueError(f"no evaluation at step {step:g}")


def loss_at(curve: list[dict[str, float]], wall: float) -> float:
    """Validation loss at wall-clock ``wall`` (linear between evaluations; the last one past the end)."""
    for a, b in zip(curve, curve[1:], strict=False):
        if b["wall_s"] >= wall:
            f = (wall - a["wall_s"]) / max(b["wall_s"] - a["wall_s"], 1e-12)
            return a["val_loss"] + f * (b["val_loss"] - a["val_loss"])
    return curve[-1]["val_loss"]


def summarize(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per recipe: medians over seeds of the final loss, wall-clock, time to exact's final loss, ..."""
    names = list(seeds[0]["runs"])
    table: dict[str, Any] = {}
    for name in names:
        rows = []
        for s in seeds:
            exact, r = s["runs"]["exact"], s["runs"][name]
            target, exact_steps = exact["curve"][-1]["val_loss"], exact["curve"][-1]["step"]
            reach = time_to(r["curve"], target)
            final = r["curve"][-1]["val_loss"]
            rows.append(
                {
                    "final_val_loss": final,
                    "wall_s": r["wall_s"],
                    "time_to_exact_final_s": reach,
                    "time_ratio": None if reach is None else reach / exact["wall_s"],
                    # at exact's step count: the final loss, or mid-run for a recipe with more steps
                    "loss_vs_exact_equal_steps": loss_at_step(r["curve"], exact_steps) / target - 1,
                    "steps": r.get("steps", exact_steps),
                    "exact_loss_at_equal_wall": loss_at(exact["curve"], r["wall_s"]),
                    "flops_fraction": r["flops"] / exact["flops"],
                }
            )
        reached = [row["time_to_exact_final_s"] for row in rows if row["time_to_exact_final_s"] is not None]

        def med(key: str, rows: list[dict[str, Any]] = rows) -> float:
            return statistics.median(row[key] for row in rows)

        table[name] = {
            "final_val_loss": med("final_val_loss"),
            "wall_s": med("wall_s"),
            "speed_vs_exact": statistics.median(
                s["runs"]["exact"]["wall_s"] / s["runs"][name]["wall_s"] for s in seeds
            ),
            "reached_exact_final": f"{len(reached)}/{len(rows)}",
            # a seed that never reached the target counts as never (infinite) for the median
            "time_to_exact_final_val_loss_s": _median_or_none([row["time_to_exact_final_s"] for row in rows]),
            "time_ratio": _median_or_none([row["time_ratio"] for row in rows]),
            "loss_vs_exact_equal_steps": med("loss_vs_exact_equal_steps"),
            "steps": med("steps"),
            "exact_loss_at_equal_wall": med("exact_loss_at_equal_wall"),
            "flops_fraction": med("flops_fraction"),
            "per_seed": rows,
        }
    return table


def _median_or_none(values: list[float | None]) -> float | None:
    m = statistics.median(math.inf if v is None else v for v in values)
    return None if math.isinf(m) else m


def headline(table: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The issue's JSON shape: exact's medians and the recipe that reaches exact's final loss soonest."""
    recipes = [n for n in table if n != "exact"]

    def key(n: str) -> tuple[float, float]:
        t = table[n]["time_to_exact_final_val_loss_s"]
        return (math.inf if t is None else t, table[n]["final_val_loss"])

    best = min(recipes, key=key)
    workload = (
        f"byte-level GPT (d={args.d}, {args.layers} layers, {args.heads} heads, seq {args.seq}, batch "
        f"{args.batch}) on the Python standard library's source, {args.steps} AdamW steps"
    )
    return {
        "workload": workload,
        "seeds": args.seeds,
        "exact": {"final_val_loss": table["exact"]["final_val_loss"], "wall_s": table["exact"]["wall_s"]},
        "best": {
            "recipe": best,
            "final_val_loss": table[best]["final_val_loss"],
            "wall_s": table[best]["wall_s"],
            "time_to_exact_final_val_loss_s": table[best]["time_to_exact_final_val_loss_s"],
        },
    }


def plot(seeds: list[dict[str, Any]], figures: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures.mkdir(parents=True, exist_ok=True)
    paths = []
    axes = (("wall_s", "training wall-clock (s)", "wallclock"), ("flops", "training FLOPs", "flops"))
    for x_key, label, name in axes:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, recipe in enumerate(seeds[0]["runs"]):
            for j, s in enumerate(seeds):
                curve = s["runs"][recipe]["curve"]
                ax.plot(
                    [p[x_key] for p in curve],
                    [p["val_loss"] for p in curve],
                    color=f"C{i}",
                    alpha=0.85,
                    lw=1.2,
                    label=recipe if j == 0 else None,
                )
        ax.set_xlabel(label + " (one line per seed)")
        losses = [p["val_loss"] for s in seeds for r in s["runs"].values() for p in r["curve"]]
        # the first steps' drop from ~5.6 would flatten the part that matters: cut it off
        ax.set_ylim(min(losses) - 0.05, min(max(losses), min(losses) + 1.0))
        ax.set_ylabel("validation loss (nats/byte)")
        ax.set_title("byte-level GPT on the Python standard library: validation loss")
        ax.legend()
        ax.grid(alpha=0.3)
        path = figures / f"ttq-{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def markdown(table: dict[str, Any]) -> str:
    """The per-recipe medians as a Markdown table (docs/time-to-quality.md)."""

    def num(v: float | None, fmt: str) -> str:
        return "never" if v is None else format(v, fmt)

    lines = [
        "| recipe | steps | final val loss | vs exact, equal steps | train wall-clock (s) | speed vs exact "
        "| time to exact's final loss (s) | / exact's wall-clock | seeds reaching it "
        "| exact's loss at the recipe's wall-clock | FLOPs / exact's |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in table.items():
        lines.append(
            f"| {name} | {r.get('steps', '')} | {r['final_val_loss']:.4f} "
            f"| {r['loss_vs_exact_equal_steps'] * 100:+.2f}% "
            f"| {r['wall_s']:.1f} | {r['speed_vs_exact']:.2f}x "
            f"| {num(r['time_to_exact_final_val_loss_s'], '.1f')} | {num(r['time_ratio'], '.2f')} "
            f"| {r['reached_exact_final']} | {r['exact_loss_at_equal_wall']:.4f} "
            f"| {r['flops_fraction']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out)
    if args.report_only:
        details = json.loads((out / "time_to_quality_runs.json").read_text())
        print(markdown(details["summary"]))
        plot(details["seeds"], Path(args.figures) if args.figures else out / "figures")
        return 0
    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    corpus = text_data.load_stdlib(limit=args.corpus_limit)
    load_before = os.getloadavg()
    started = time.time()
    seeds = [train_seed(seed, corpus, args) for seed in range(args.seeds)]
    table = summarize(seeds)
    head = headline(table, args)
    (out / "time_to_quality.json").write_text(json.dumps(head, indent=1) + "\n")
    details = {
        "command": "python tools/time_to_quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {
            **vars(args),
            "recipe_steps": [{**dataclasses.asdict(r), "steps": n} for r, n in args.recipe_steps],
        },
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "threads": args.threads,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "elapsed_s": time.time() - started,
        },
        "corpus": {"train_bytes": len(corpus.train), "val_bytes": len(corpus.val), "root": corpus.root},
        "summary": table,
        "seeds": seeds,
    }
    (out / "time_to_quality_runs.json").write_text(json.dumps(details, indent=1) + "\n")
    plot(seeds, Path(args.figures) if args.figures else out / "figures")
    print(json.dumps(head, indent=1))
    print(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
