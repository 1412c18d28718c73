"""Train on real MNIST in ONNX Runtime: the exact export vs the budget's export, same start.

    .venv/bin/python tools/ort_train.py                          # full MNIST, demo MLP and CNN, 3 epochs
    .venv/bin/python tools/ort_train.py --data mnist_5k --epochs 1 --models mlp   # a quick look

For each model of ``make demo`` (tools/demo.py) this exports two sets of ORT training
artifacts from the same initial weights -- ``optimize(budget=1.0)`` (nothing sampled) and
``optimize(budget)`` -- trains each with ORT's AdamW (or SGD, which has no momentum in ORT)
on the same batch order (every batch,
the last, smaller one included: the exported batch axis is symbolic), with a linear
warm-up over the first epoch and a cosine decay set through ``set_learning_rate``. The
trained weights then come back into a PyTorch copy of the model (``OrtTrainer.load_into``)
and the test accuracy is computed there, in eval mode: the whole round trip is in the number.

``--engine torch`` trains the same two rewritten modules in PyTorch instead (torch's AdamW
or SGD with the same schedule and batches): the reference the ORT numbers should match.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from demo import accuracy, lr_factor, make_cnn, make_mlp  # tools/ is on sys.path when this runs as a script
from image_data import Split, load_mnist, load_mnist_5k
from torch import nn
from tqdm import tqdm

import approxcompile
from approxcompile.export import OrtTrainer, export_training

MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": make_mlp, "cnn": make_cnn}
LR = {"adamw": 1e-3, "sgd": 0.5}  # plain SGD: the demo's 0.1 with momentum 0.9 is ~1.0 effective


@dataclass(frozen=True)
class Row:
    engine: str
    model: str
    variant: str
    sampled_nodes: int
    test_accuracy: float
    final_loss: float
    train_seconds: float
    seconds_per_step: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--data", choices=["mnist", "mnist_5k"], default="mnist")
    p.add_argument("--budget", type=float, default=0.4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimizer", choices=list(LR), default="adamw")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: adamw 1e-3, sgd 0.5)")
    p.add_argument("--engine", choices=["ort", "torch"], default="ort", help="where to train (default: ort)")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    return p.parse_args(argv)


Step = Callable[[torch.Tensor, torch.Tensor, float], float]  # (x, y, learning rate) -> loss


def train(step_fn: Step, split: Split, args: argparse.Namespace, lr: float, desc: str) -> list[float]:
    n = len(split.x_train)
    per_epoch = math.ceil(n / args.batch)
    total, warmup = args.epochs * per_epoch, per_epoch
    order = torch.Generator().manual_seed(args.seed)
    losses = []
    with tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True) as bar:
        for _ in range(args.epochs):
            perm = torch.randperm(n, generator=order)
            for i in range(per_epoch):
                step = len(losses)
                rate = lr_factor(step, warmup, total)
                idx = perm[i * args.batch : (i + 1) * args.batch]  # the last batch is smaller
                losses.append(step_fn(split.x_train[idx], split.y_train[idx], lr * rate))
                bar.update()
                if bar.n % 20 == 0:
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return losses


def run(name: str, split: Split, args: argparse.Namespace, workdir: Path) -> list[Row]:
    make, lr = MODELS[name], args.lr or LR[args.optimizer]
    torch.manual_seed(args.seed)
    initial = make()
    example = split.x_train[: args.batch]
    rows = []
    for variant, budget in (("exact", 1.0), (f"budget={args.budget:g}", args.budget)):
        torch.manual_seed(args.seed + 1)
        fast = approxcompile.optimize(copy.deepcopy(initial), budget, example_inputs=(example,))
        sampled = len(approxcompile.report(fast).sampled)
        if args.engine == "ort":
            art = export_training(fast, (example,), workdir / f"{name}-{budget}", optimizer=args.optimizer)
            trainer = OrtTrainer(art, lr=lr, threads=args.threads, seed=args.seed)
            step_fn, finish = _ort_step(trainer), lambda t=trainer: t.load_into(copy.deepcopy(initial))
        else:
            step_fn, finish = _torch_step(fast, args.optimizer), lambda m=fast: m
        start = time.perf_counter()
        losses = train(step_fn, split, args, lr, f"{name} {variant} ({args.engine})")
        seconds = time.perf_counter() - start
        trained = finish()  # ORT: the weights come back into a PyTorch copy, tested there
        tail = losses[-50:]
        rows.append(
            Row(
                args.engine,
                name,
                variant,
                sampled,
                accuracy(trained, split),
                sum(tail) / len(tail),
                seconds,
                seconds / len(losses),
            )
        )
    return rows


def _ort_step(trainer: OrtTrainer) -> Step:
    def step(x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
        trainer.optimizer.set_learning_rate(lr)
        return trainer.step(x, y)

    return step


def _torch_step(model: nn.Module, optimizer: str) -> Step:
    params = list(model.parameters())
    opt = torch.optim.AdamW(params) if optimizer == "adamw" else torch.optim.SGD(params, lr=0.0)
    model.train()

    def step(x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
        for group in opt.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    split = load_mnist() if args.data == "mnist" else load_mnist_5k()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="ort_train_") as tmp:
        for name in args.models:
            rows += run(name, split, args, Path(tmp))
    print(
        f"\n{split.name}: {len(split.x_train)} train / {len(split.x_test)} test, {args.epochs} epoch(s), "
        f"batch {args.batch}, {args.engine} {args.optimizer}"
    )
    print("| model | variant | sampled nodes | test accuracy | loss (last 50 steps) | train s | ms/step |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.model} | {r.variant} | {r.sampled_nodes} | {r.test_accuracy:.2%} | {r.final_loss:.4f} "
            f"| {r.train_seconds:.1f} | {r.seconds_per_step * 1e3:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
