"""The MNIST cells of ``tools/replicate.py`` (CNN one epoch, MLP three epochs) with a budget schedule.

For each seed, the exact model and the model under a named schedule
(``approxcompile.schedule.Scheduler``) start from the same initial weights (``replicate.build``)
and the same batch order, and train interleaved step by step in one process, so the machine's
load falls on both alike. Reported per seed: training wall-clock of each, test accuracy (eval
mode: exact products) of each.

``--optimizer fused`` builds the cell's optimizer (Adam, SGD) with ``fused=True`` for both
models: the same update with PyTorch's fused CPU kernels. The default kernels are slower on
a sampled model: its never-kept weight columns keep exactly-zero Adam state, and the square
root of exact zeros is ~15x slower on the development CPU (MLP step at budget 0.3: 7.55 ms
against exact's 7.18 with the default Adam, 4.82 against 4.69 with the fused one).

``--flush-denormal`` sets ``torch.set_flush_denormal(True)`` for the process (both models):
Adam's moments of weight columns that get no gradient for a while decay into float32's
subnormal range (after about 750 steps of zero gradient for ``beta1 = 0.9``), where x86
CPUs compute much slower; a forward-sampled layer leaves more columns without gradient than
exact training does (after 3,000 MLP steps at budget 0.4: 190,105 subnormal first moments
against exact's 52,531 of 648,010, and fused Adam at 727 against 541 us per step; with the
flag, none and 376 against 312 us).

    .venv/bin/python tools/ttq_mnist.py --schedule anneal_to_exact --budget 0.2 --fraction 0.3
    .venv/bin/python tools/ttq_mnist.py --models mlp --optimizer fused --schedule constant --budget 0.6
    .venv/bin/python tools/ttq_mnist.py --models mlp --optimizer fused --weight-norms-every 10 --budget 0.4
    .venv/bin/python tools/ttq_mnist.py --quick            # 1,000 images, 1 seed: a smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import replicate
import torch
import torch.nn.functional as F
from image_data import Split, load_mnist

from approxcompile import schedule


def train_pair(model_name: str, seed: int, split: Split, args: argparse.Namespace) -> dict:
    setup = replicate.SETUPS[model_name]
    if args.weight_norms_every != 1:
        setup = setup.with_config(weight_norms_every=args.weight_norms_every)
    epochs = args.epochs or setup.epochs
    x0 = split.x_train[: setup.batch]
    job = replicate.Job(model=model_name, variant="topk", budget=args.budget, seed=seed, epochs=epochs)
    exact, _ = replicate.build(dataclasses.replace(job, variant=replicate.EXACT, budget=1.0), setup, x0)
    fast, _ = replicate.build(job, setup, x0)
    n, batch = len(split.x_train), setup.batch
    steps = n // batch
    sched = schedule.Scheduler(fast, args.schedule, epochs * steps, args.budget, fraction=args.fraction)
    models = {"exact": exact, "scheduled": fast}
    fused = args.optimizer == "fused"
    opts = {k: setup.optimizer(list(m.parameters()), fused=fused) for k, m in models.items()}
    wall = dict.fromkeys(models, 0.0)
    order = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1000)
    for m in models.values():
        m.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=order)
        for i in range(steps):
            idx = perm[i * batch : (i + 1) * batch]
            xb, yb = split.x_train[idx], split.y_train[idx]
            for name in ("exact", "scheduled") if i % 2 == 0 else ("scheduled", "exact"):
                t = time.perf_counter()
                if name == "scheduled":
                    sched.step()
                loss = F.cross_entropy(models[name](xb), yb)
                opts[name].zero_grad(set_to_none=True)
                loss.backward()
                opts[name].step()
                wall[name] += time.perf_counter() - t
    return {
        "model": model_name,
        "seed": seed,
        "epochs": epochs,
        "wall_s": wall,
        "test_accuracy": {k: replicate.accuracy(m, split) for k, m in models.items()},
        "replans": sched.replans,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["cnn", "mlp"], choices=sorted(replicate.SETUPS))
    p.add_argument("--schedule", default="anneal_to_exact", choices=sorted(schedule.SCHEDULES))
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--fraction", type=float, default=0.3)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, help="default: the replicate cell's (mlp 3, cnn 1)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--optimizer", choices=("paper", "fused"), default="paper",
        help="both models' optimizer: the cell's with PyTorch's default kernels, or with fused=True",
    )  # fmt: skip
    p.add_argument(
        "--weight-norms-every", type=int, default=1, metavar="N",
        help="ApproxConfig.weight_norms_every of the scheduled model (default: 1, every step)",
    )  # fmt: skip
    p.add_argument(
        "--flush-denormal", action="store_true",
        help="torch.set_flush_denormal(True) for the whole process, so for both models alike",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="JSON of every run")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.flush_denormal:
        replicate.flush_denormals(p)
    split = load_mnist()
    if args.quick:
        split = Split(split.x_train[:1000], split.y_train[:1000], split.x_test, split.y_test, split.name)
        args.seeds, args.epochs = 1, 1
    rows = [train_pair(m, s, split, args) for m in args.models for s in range(args.seeds)]
    for m in args.models:
        mine = [r for r in rows if r["model"] == m]
        gap = statistics.median(
            (r["test_accuracy"]["scheduled"] - r["test_accuracy"]["exact"]) * 100 for r in mine
        )
        speed = statistics.median(r["wall_s"]["exact"] / r["wall_s"]["scheduled"] for r in mine)
        print(
            f"{m}: accuracy scheduled - exact {gap:+.2f} points (median), exact/scheduled wall {speed:.2f}x"
        )
        for r in mine:
            print(f"  seed {r['seed']}: {json.dumps({k: r[k] for k in ('wall_s', 'test_accuracy')})}")
    if args.out is not None:
        settings = vars(args) | {"out": str(args.out)}
        record = {"command": " ".join(sys.argv), "settings": settings, "runs": rows}
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
