"""Exact vs sampled training, side by side, on real handwritten digits (``make demo``).

Each model is trained twice from the *same* initial weights and on the same
batch order: once as written, once as ``approxcompile.optimize(model, budget)``.
The table at the end shows what sampling costs in test accuracy and what it
saves in training FLOPs (measured with ``FlopCounterMode`` on one real training
step, not taken from the cost model) and in wall time.

    .venv/bin/python tools/demo.py              # ~80 s on 2 idle cores
    .venv/bin/python tools/demo.py --quick      # a few seconds, for smoke tests
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from image_data import Split, load_mnist_5k
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import approxcompile

BATCH = 64


def make_mlp() -> nn.Module:
    """784-1024-1024-1024-1024-10: wide enough that the four big linears dominate a training step."""
    widths = [28 * 28, 1024, 1024, 1024, 1024]
    layers: list[nn.Module] = [nn.Flatten()]
    for n_in, n_out in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], 10))
    return nn.Sequential(*layers)


def make_cnn() -> nn.Module:
    """Three 3x3 convs and two linears: small enough for 2 CPU cores, with convs carrying most FLOPs."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


@dataclass(frozen=True)
class Spec:
    name: str
    make: Callable[[], nn.Module]
    lr: float
    epochs: int


@dataclass(frozen=True)
class Result:
    model: str
    variant: str
    accuracy: float
    flops_per_step: int
    optimize_seconds: float
    train_seconds: float


SPECS = (
    Spec("mlp", make_mlp, lr=0.1, epochs=15),
    Spec("cnn", make_cnn, lr=0.05, epochs=10),
)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """The learning rate at ``step`` over its peak: linear warm-up over ``warmup`` steps, cosine decay."""
    return min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * step / total))


def train(model: nn.Module, split: Split, *, lr: float, epochs: int, seed: int, desc: str) -> float:
    """Train with SGD + momentum, one warm-up epoch and a cosine decay; return wall seconds.

    Both variants get the same schedule. The warm-up matters for the sampled
    CNN: at the full rate from step 0 its biased top-k gradients can kill the
    network (loss stuck at ln 10) when the rate stays high for long, as it does
    with 10 epochs. The decay lets a few epochs settle, so the variants'
    accuracies differ by the sampling, not by where SGD happened to stop. The
    batch order depends only on ``seed``.
    """
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    n = len(split.x_train)
    steps = epochs * (n // BATCH)
    warmup = n // BATCH

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, warmup, steps))
    order = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    with tqdm(total=steps, desc=desc, unit="step", leave=True, dynamic_ncols=True) as bar:
        for _ in range(epochs):
            perm = torch.randperm(n, generator=order)
            for i in range(n // BATCH):  # drop the ragged last batch: one shape for the rewritten graph
                idx = perm[i * BATCH : (i + 1) * BATCH]
                loss = F.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
                bar.update()
                if bar.n % 10 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model: nn.Module, split: Split) -> float:
    """Test accuracy in eval mode, where a rewritten model runs the exact operations."""
    model.eval()
    correct = 0
    for i in range(0, len(split.x_test), 500):
        logits = model(split.x_test[i : i + 500])
        correct += int((logits.argmax(dim=1) == split.y_test[i : i + 500]).sum())
    return correct / len(split.x_test)


def training_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one real training step (forward + backward, train mode), as PyTorch's counter sees them.

    Measured rather than read from the plan, so the table checks the budget
    instead of repeating it. Gradients are dropped afterwards; no optimizer step.
    """
    model.train()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def run(spec: Spec, split: Split, *, budget: float, epochs: int, seed: int) -> list[Result]:
    """Train ``spec``'s model exactly and under ``budget`` from one initialisation; print the report."""
    torch.manual_seed(seed)
    initial = spec.make()
    xb, yb = split.x_train[:BATCH], split.y_train[:BATCH]
    results = []
    for variant in ("exact", f"budget={budget:g}"):
        torch.manual_seed(seed + 1)  # same sampling/dropout stream start for both variants
        model = copy.deepcopy(initial)
        compile_seconds = 0.0
        if variant != "exact":
            start = time.perf_counter()
            # optimize shares parameters with its input and never mutates it, so `initial` stays clean.
            model = approxcompile.optimize(model, budget=budget, example_inputs=(xb,))
            compile_seconds = time.perf_counter() - start
            print(f"\n--- {spec.name}: approximation report ---")
            print(approxcompile.report(model))
        seconds = train(model, split, lr=spec.lr, epochs=epochs, seed=seed, desc=f"{spec.name} {variant}")
        flops = training_flops(model, xb, yb)
        results.append(Result(spec.name, variant, accuracy(model, split), flops, compile_seconds, seconds))
    return results


def format_table(results: list[Result]) -> str:
    """Side-by-side table; FLOPs are also shown relative to the exact run of the same model."""
    exact = {r.model: r for r in results if r.variant == "exact"}
    header = (
        f"{'model':<6} {'variant':<12} {'test acc':>8} {'GFLOP/step':>10} {'vs exact':>8} "
        f"{'optimize s':>10} {'train s':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        base = exact[r.model]
        ratio = r.flops_per_step / base.flops_per_step
        lines.append(
            f"{r.model:<6} {r.variant:<12} {r.accuracy:>8.2%} {r.flops_per_step / 1e9:>10.3f} {ratio:>8.2f} "
            f"{r.optimize_seconds:>10.1f} {r.train_seconds:>8.1f}"
        )
    # Two torch threads on two cores slow down several-fold when anything else runs, more so for dense steps.
    lines.append("(wall times compare only on an otherwise idle machine)")
    return "\n".join(lines)


def subset(split: Split, n_train: int, n_test: int) -> Split:
    """The first examples of each half; the split is shuffled, so they mix all classes."""
    x_train, y_train = split.x_train[:n_train], split.y_train[:n_train]
    return Split(x_train, y_train, split.x_test[:n_test], split.y_test[:n_test], split.name)


def main(argv: list[str] | None = None) -> list[Result]:
    names = [s.name for s in SPECS]
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--epochs", type=int, help="epochs for every model (default: per model)")
    parser.add_argument("--budget", type=float, default=0.4, help="fraction of training FLOPs to spend")
    parser.add_argument("--models", nargs="+", choices=names, default=names)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="1 epoch on 512 images: a smoke test only")
    args = parser.parse_args(argv)

    # Use every core this process may run on; the default can be fewer, which would skew wall times.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(cores)
    split = load_mnist_5k(seed=args.seed)
    if args.quick:
        split = subset(split, 512, 256)
    print(f"data: {split}, torch threads: {torch.get_num_threads()}")

    results: list[Result] = []
    for spec in SPECS:
        if spec.name in args.models:
            epochs = 1 if args.quick else args.epochs or spec.epochs
            results += run(spec, split, budget=args.budget, epochs=epochs, seed=args.seed)
    print()
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
