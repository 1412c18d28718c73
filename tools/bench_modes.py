"""Sampling modes: activation memory saved for backward, and test accuracy after training (issue 6).

Variants of one MLP on the 5,000-image MNIST subset (4,000 train / 1,000 test), all from
the same initial weights, trained with SGD(lr=0.05, momentum=0.9) for E epochs:

- ``exact``; ``forward topk`` / ``forward bernoulli``: ``optimize(..., budget)`` (forward
  sampling, the default mode, activation-and-weight scores);
- ``backward x_dy``: ``ApproxConfig(mode="backward", method="bernoulli")`` (row scores
  ``|X[b]|·|dY[b]|``, X saved in full);
- ``backward x``: the same with ``row_scores="x"`` (rows drawn in the forward pass from
  ``|X[b]|``; only the sampled rows are saved);
- ``weights topk`` / ``weights bernoulli``: forward sampling with ``scores="weights"``, what
  data-parallel ranks run with ``approxcompile.distributed`` (the hook's average equals a
  plain all-reduce, so one process shows the accuracy of the same updates).

Saved memory: bytes of every tensor autograd saves for backward during one training forward
(``torch.autograd.graph.saved_tensors_hooks``), parameters and their views excluded, at the
training batch size; it is what the step keeps alive between forward and backward.

    .venv/bin/python tools/bench_modes.py                 # defaults below
    .venv/bin/python tools/bench_modes.py --epochs 1      # quicker
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from image_data import load_mnist_5k  # noqa: E402

import approxcompile  # noqa: E402


def mlp(sizes: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(sizes[:-1], sizes[1:], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.untyped_storage().data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return total


def train(model: nn.Module, data, epochs: int, batch: int) -> float:
    """Test accuracy after training (step times belong to tools/bench.py, not here)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(data.x_train), generator=g)
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i : i + batch]
            opt.zero_grad()
            F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return float((model(data.x_test).argmax(1) == data.y_test).float().mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="784,1024,1024,1024,10")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--budget", type=float, default=0.6, help="budget of every approximated variant")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    sizes = tuple(int(s) for s in args.sizes.split(","))
    data = load_mnist_5k(seed=0)
    x = data.x_train[: args.batch]
    configs = {
        "exact": None,
        "forward topk": approxcompile.ApproxConfig(),
        "forward bernoulli": approxcompile.ApproxConfig(method="bernoulli"),
        "backward x_dy": approxcompile.ApproxConfig(mode="backward", method="bernoulli"),
        "backward x": approxcompile.ApproxConfig(mode="backward", method="bernoulli", row_scores="x"),
        "weights topk": approxcompile.ApproxConfig(scores="weights"),
        "weights bernoulli": approxcompile.ApproxConfig(scores="weights", method="bernoulli"),
    }
    print(f"MLP {args.sizes}, batch {args.batch}, {args.epochs} epochs, budget {args.budget}, MNIST-5k")
    print("| variant | planned FLOPs / exact | saved for backward (MB) | vs exact | test acc |")
    print("|---|---|---|---|---|")
    base = None
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model = mlp(sizes)
        frac = 1.0
        if cfg is not None:
            model = approxcompile.optimize(model, args.budget, example_inputs=(x,), config=cfg)
            frac = approxcompile.report(model).plan.fraction
        mem = saved_bytes(model, x)
        base = base or mem
        acc = train(model, data, args.epochs, args.batch)
        print(f"| {name} | {frac:.3f} | {mem / 2**20:.2f} | {mem / base:.3f} | {acc:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
