"""Reproduce the paper's MNIST experiments: accuracy against training compute, on real data.

Adelman et al. (NeurIPS 2021) train an MLP and a CNN on MNIST with sampled products.
This script trains the same two setups exactly and with ``approxcompile.optimize`` over
a grid of sampling methods and FLOP budgets, and also with the paper's own recipe: one
keep ratio shared by every eligible layer, chosen so the step costs the same budget
(pinned with ``NodeOverride(keep=r)``), against the cost model's per-node allocation.

Every run starts from the initial weights and batch order of its seed, so runs of one
seed differ only by the approximation. Each finished run is cached as one JSON file under
``--cache``; an interrupted grid resumes where it stopped. The table (``docs/results.md``)
and the plots are written from the cache, so ``--report-only`` redraws them at any time.

    .venv/bin/python tools/replicate.py                                    # the grid (hours)
    .venv/bin/python tools/replicate.py --models mlp --epochs 3            # one model's grid
    .venv/bin/python tools/replicate.py --report-only                      # table + plots
    .venv/bin/python tools/replicate.py --quick                            # smoke test (~4-5 min idle)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from image_data import Split, load_mnist
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import approxcompile
from approxcompile.config import ApproxConfig, NodeOverride
from approxcompile.plan import META_KEY, Plan, kept_count

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("topk", "crs", "bernoulli", "uniform", "wta_crs")
BUDGETS = (0.6, 0.4, 0.3, 0.2)
RATIO = "topk-single-ratio"  # the paper's recipe: one keep ratio on every eligible layer, top-k
EXACT = "exact"


class MLP(nn.Module):
    """784-500-500-10 with dropout 0.1 after each hidden layer (the paper's MNIST MLP)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 500), nn.Linear(500, 500), nn.Linear(500, 10)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(F.relu(self.fc1(x.flatten(1))))
        x = self.drop(F.relu(self.fc2(x)))
        return self.fc3(x)


class CNN(nn.Module):
    """conv5x5 1->32, pool, conv5x5 32->64, pool, FC 3136->1024->10 (the paper's MNIST CNN)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 5, padding=2), nn.Conv2d(32, 64, 5, padding=2)
        self.fc1, self.fc2 = nn.Linear(64 * 7 * 7, 1024), nn.Linear(1024, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


@dataclass(frozen=True, kw_only=True)
class Setup:
    """One of the paper's reference setups: model, optimizer, batch size, and what stays exact.

    config: the MLP has three linears; keeping the first and last exact (the default)
    leaves only fc2, 39% of the step, so budgets below 0.61 would be infeasible. fc1
    (784 pixel columns) is therefore sampled and only the 10-way output layer is exact.
    """

    name: str
    make: Callable[[], nn.Module]
    # optimizer(params, fused=False); fused=True: PyTorch's fused kernels, the same algorithm
    optimizer: Callable[..., torch.optim.Optimizer]
    batch: int
    config: ApproxConfig
    epochs: int  # what the shared 2-core machine fits for a 126-run grid (docs/results.md)

    def with_config(self, **changes: Any) -> Setup:
        """This setup with ``changes`` to its ``ApproxConfig`` fields (e.g. ``weight_norms_every=10``)."""
        return replace(self, config=replace(self.config, **changes))


SETUPS = {
    "mlp": Setup(
        name="mlp",
        make=MLP,
        optimizer=lambda params, fused=False: torch.optim.Adam(params, fused=fused or None),
        batch=50,
        config=ApproxConfig(exclude_first_last=False).set_module_name("fc3", NodeOverride(exact=True)),
        epochs=3,
    ),
    "cnn": Setup(
        name="cnn",
        make=CNN,
        optimizer=lambda params, fused=False: torch.optim.SGD(
            params, lr=0.01, momentum=0.5, fused=fused or None
        ),
        batch=64,
        config=ApproxConfig(),
        epochs=1,
    ),
}


@dataclass(frozen=True, kw_only=True)
class Job:
    model: str
    variant: str  # EXACT, a method name, or RATIO
    budget: float
    seed: int
    epochs: int

    @property
    def key(self) -> str:
        longer = "" if self.epochs == SETUPS[self.model].epochs else f"_e{self.epochs}"
        return f"{self.model}_{self.variant}_b{self.budget:g}_s{self.seed}{longer}"


# Longer training where the grid's epochs leave a model far from converged: exact and top-k
# at 0.4 only, since the question there is whether the gap closes with training.
LONGER = {"cnn": 3}


def flush_denormals(parser: argparse.ArgumentParser) -> None:
    """``torch.set_flush_denormal(True)`` for the whole process (``--flush-denormal`` of the MNIST tools)."""
    if not torch.set_flush_denormal(True):
        parser.error("--flush-denormal: this CPU cannot flush denormals (no SSE3)")


def grid(models: list[str], seeds: int, epochs: int | None = None, longer: bool = True) -> list[Job]:
    """Every run, most important first, so a grid cut short still answers the two questions.

    1. exact, top-k and the single ratio at budget 0.4; 2. the other methods at 0.4,
    top-k / single ratio at the other budgets, and the LONGER runs; 3. everything else.
    Seeds inside each tier. ``epochs`` overrides every setup's own.
    """
    jobs: list[tuple[int, Job]] = []
    for m in models:
        e = epochs or SETUPS[m].epochs
        for s in range(seeds):
            jobs.append((0, Job(model=m, variant=EXACT, budget=1.0, seed=s, epochs=e)))
            for b in BUDGETS:
                for v in (*METHODS, RATIO):
                    main = v in ("topk", RATIO)
                    tier = 0 if main and b == 0.4 else 1 if main or b == 0.4 else 2
                    jobs.append((tier, Job(model=m, variant=v, budget=b, seed=s, epochs=e)))
            if longer and m in LONGER:
                for v, b in ((EXACT, 1.0), ("topk", 0.4)):
                    jobs.append((1, Job(model=m, variant=v, budget=b, seed=s, epochs=LONGER[m])))
    return [j for _, j in sorted(jobs, key=lambda t: (t[0], t[1].seed))]


def single_ratio_config(setup: Setup, plan: Plan, budget: float) -> tuple[ApproxConfig, float]:
    """The paper's recipe at ``budget``: the largest keep ratio r that, pinned on every node the
    cost model may sample, costs no more than ``budget`` of the dense step (overheads included).
    """
    eligible = [p for p in plan.nodes if p.reason is None or p.reason.startswith("budget is met")]
    fixed = plan.other_flops + sum(p.flops.total for p in plan.nodes if p not in eligible)

    def fraction(r: float) -> float:
        return (fixed + sum(p.cost(kept_count(r, p.inner)) for p in eligible)) / plan.dense_flops

    lo, hi = 0.0, 1.0
    for _ in range(40):  # bisection: cost is monotone in r
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fraction(mid) <= budget else (lo, mid)
    config = setup.config
    for p in eligible:
        config = config.set_module_name(p.name, NodeOverride(keep=lo))
    return config, lo


def train(model: nn.Module, setup: Setup, split: Split, *, epochs: int, seed: int, desc: str) -> dict:
    """Train; return wall seconds, the mean loss of each epoch and a finer trace (20 points an epoch)."""
    opt = setup.optimizer(list(model.parameters()))
    n, batch = len(split.x_train), setup.batch
    steps = n // batch  # drop the ragged last batch: one input shape for the rewritten graph
    every = max(1, steps // 20)
    order = torch.Generator().manual_seed(seed)
    epoch_loss, trace, window = [], [], []
    model.train()
    start = time.perf_counter()
    with tqdm(total=epochs * steps, desc=desc, unit="step", leave=False, dynamic_ncols=True) as bar:
        for _ in range(epochs):
            perm, total = torch.randperm(n, generator=order), 0.0
            for i in range(steps):
                idx = perm[i * batch : (i + 1) * batch]
                loss = F.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                value = loss.item()
                total += value
                window.append(value)
                if len(window) == every:
                    trace.append(sum(window) / every)
                    window = []
                    bar.set_postfix(loss=f"{trace[-1]:.3f}")
                bar.update()
            epoch_loss.append(total / steps)
    return {"train_seconds": time.perf_counter() - start, "epoch_loss": epoch_loss, "loss_trace": trace}


@torch.no_grad()
def accuracy(model: nn.Module, split: Split) -> float:
    """Test accuracy in eval mode, where a rewritten model runs the exact operations."""
    model.eval()
    correct = sum(
        int((model(split.x_test[i : i + 1000]).argmax(1) == split.y_test[i : i + 1000]).sum())
        for i in range(0, len(split.x_test), 1000)
    )
    return correct / len(split.x_test)


def step_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one real training step (forward + backward), as ``FlopCounterMode`` counts them."""
    model.train()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def build(job: Job, setup: Setup, x: torch.Tensor) -> tuple[nn.Module, dict]:
    """The job's model from its seed's initial weights: exact, optimized, or at the single ratio."""
    torch.manual_seed(job.seed)
    model = setup.make()
    if job.variant == EXACT:
        return model, {"planned_fraction": 1.0, "keeps": {}}
    method = "topk" if job.variant == RATIO else job.variant
    config, extra = setup.config, {}
    if job.variant == RATIO:
        allocated = approxcompile.optimize(model, job.budget, example_inputs=(x,), config=config)
        config, ratio = single_ratio_config(setup, allocated.meta[META_KEY], job.budget)
        extra["single_ratio"] = ratio
    fast = approxcompile.optimize(model, job.budget, example_inputs=(x,), method=method, config=config)
    plan: Plan = fast.meta[META_KEY]
    keeps = {p.name: round(p.keep, 4) for p in plan.nodes if p.sampled}
    return fast, {"planned_fraction": plan.fraction, "keeps": keeps, **extra}


def run(job: Job, split: Split) -> dict:
    """Train one job to the end; the result record that goes into the cache."""
    setup = SETUPS[job.model]
    x, y = split.x_train[: setup.batch], split.y_train[: setup.batch]
    model, info = build(job, setup, x)
    dense = step_flops(setup.make(), x, y)
    flops = step_flops(model, x, y)
    torch.manual_seed(job.seed + 1000)  # dropout and sampling streams: the same start for every variant
    trained = train(model, setup, split, epochs=job.epochs, seed=job.seed, desc=job.key)
    return {
        **asdict(job),
        **info,
        **trained,
        "test_accuracy": accuracy(model, split),
        "flops_per_step": flops,
        "measured_fraction": flops / dense,
        "n_train": len(split.x_train),
        "n_test": len(split.x_test),
        "data": split.name,
        "machine": machine(),
    }


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in _lines("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor() or "unknown CPU",
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{cpu}, {cores} cores (shared), torch {torch.__version__} with {torch.get_num_threads()} thread(s), "
        f"Python {platform.python_version()}"
    )


def _lines(path: str) -> Iterator[str]:
    try:
        with open(path) as f:
            yield from f
    except OSError:
        return


def load_cache(cache: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(cache.glob("*.json"))}


def save(cache: Path, key: str, record: dict) -> None:
    """Write atomically: an interrupted write must not leave a half file that resumption trusts."""
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{key}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, cache / f"{key}.json")


@contextmanager
def claim(cache: Path, key: str) -> Iterator[bool]:
    """Claim a run for this process, so several workers can share one cache without doing a run twice.

    A lock file holds the owner's pid; a lock whose owner is gone (an interrupted worker)
    is taken over.
    """
    cache.mkdir(parents=True, exist_ok=True)
    lock = cache / f".{key}.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(lock.read_text() or 0), 0)
            yield False
            return
        except (ProcessLookupError, ValueError):
            lock.unlink(missing_ok=True)
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield True
    finally:
        lock.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=sorted(SETUPS), default=sorted(SETUPS))
    parser.add_argument("--epochs", type=int, help="epochs for every model (default: mlp 3, cnn 1)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n-train", type=int, help="train on the first N of the 50,000 images")
    parser.add_argument("--cache", type=Path, help="finished runs (default docs/replicate-runs)")
    parser.add_argument("--out", type=Path, help="where results.md and plots go (default docs)")
    parser.add_argument("--max-runs", type=int, help="stop after this many new runs")
    parser.add_argument("--report-only", action="store_true", help="rewrite table and plots from the cache")
    parser.add_argument("--quick", action="store_true", help="1 epoch, 1 seed, 1,000 images: a smoke test")
    args = parser.parse_args(argv)
    # A smoke test must not mix its 1-epoch runs into the published cache and page.
    default = ROOT / "build" / "replicate-quick" if args.quick else ROOT / "docs"
    args.cache = args.cache or default / ("runs" if args.quick else "replicate-runs")
    args.out = args.out or default
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # the grid shares a small machine; one thread keeps wall times comparable

    if not args.report_only:
        split = load_mnist()
        n_train = 1000 if args.quick else args.n_train
        if n_train:
            split = Split(
                split.x_train[:n_train], split.y_train[:n_train], split.x_test, split.y_test, split.name
            )
        seeds, epochs = (1, 1) if args.quick else (args.seeds, args.epochs)
        done = load_cache(args.cache)
        todo = [j for j in grid(args.models, seeds, epochs, longer=not args.quick) if j.key not in done]
        todo = todo[: args.max_runs] if args.max_runs is not None else todo
        print(f"data {split}; {len(todo)} run(s) to do, {len(done)} cached", file=sys.stderr)
        for job in tqdm(todo, desc="grid", unit="run", dynamic_ncols=True):
            with claim(args.cache, job.key) as mine:
                if not mine or (args.cache / f"{job.key}.json").exists():
                    continue  # another worker on the same cache has it
                record = run(job, split)
                save(args.cache, job.key, record)
            tqdm.write(f"{job.key}: acc {record['test_accuracy']:.4f}, {record['train_seconds']:.0f} s")

    from replicate_report import write_report  # matplotlib only where a report is drawn

    print(f"wrote {write_report(load_cache(args.cache), args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
