"""Per-step time of the MNIST cells of ``tools/replicate.py``: exact against constant budgets.

Why: ``tools/ttq_mnist.py`` reports whole-run wall-clocks; to see whether a budget's step is
faster than exact at all (the MLP's 500-wide layers at batch 50 are near the size where the
sampling's fixed work eats the saved FLOPs) this times single steps. The exact model and one
model per budget (``replicate.build``, the cell's optimizer, ``--optimizer`` as in
``ttq_mnist``) take turns on the same random batches in one process, in alternating order;
reported: the median step of each after ``--warmup`` steps, and exact's median over it.

    .venv/bin/python tools/step_mnist.py mlp --budgets 0.2 0.3 0.6 --optimizer fused
    .venv/bin/python tools/step_mnist.py mlp --budgets 0.4 --optimizer fused --weight-norms-every 1 10
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import replicate
import torch
import torch.nn.functional as F
from image_data import load_mnist


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=sorted(replicate.SETUPS))
    p.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.6])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--optimizer", choices=("paper", "fused"), default="paper")
    p.add_argument(
        "--weight-norms-every", type=int, nargs="+", default=[1], metavar="N",
        help="ApproxConfig.weight_norms_every; several values: one sampled model per budget and value",
    )  # fmt: skip
    p.add_argument("--flush-denormal", action="store_true", help="torch.set_flush_denormal(True)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.flush_denormal:
        replicate.flush_denormals(p)
    setup, split = replicate.SETUPS[args.model], load_mnist()
    x0 = split.x_train[: setup.batch]
    job = replicate.Job(model=args.model, variant="topk", budget=1.0, seed=0, epochs=1)
    models = {"exact": replicate.build(dataclasses.replace(job, variant=replicate.EXACT), setup, x0)[0]}
    for b in args.budgets:
        for every in args.weight_norms_every:
            name = f"budget {b}" + (f" every {every}" if len(args.weight_norms_every) > 1 else "")
            job_b = dataclasses.replace(job, budget=b)
            models[name] = replicate.build(job_b, setup.with_config(weight_norms_every=every), x0)[0]
    fused = args.optimizer == "fused"
    opts = {k: setup.optimizer(list(m.parameters()), fused=fused) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    batches = torch.Generator().manual_seed(0)
    for m in models.values():
        m.train()
    for i in range(args.warmup + args.steps):
        idx = torch.randint(0, len(split.x_train), (setup.batch,), generator=batches)
        xb, yb = split.x_train[idx], split.y_train[idx]
        for k in list(models) if i % 2 == 0 else list(models)[::-1]:
            t = time.perf_counter()
            loss = F.cross_entropy(models[k](xb), yb)
            opts[k].zero_grad(set_to_none=True)
            loss.backward()
            opts[k].step()
            if i >= args.warmup:
                times[k].append(time.perf_counter() - t)
    exact = statistics.median(times["exact"])
    for k, v in times.items():
        med = statistics.median(v)
        print(f"{args.model} {k:<20} {med * 1e3:7.2f} ms/step   exact/this {exact / med:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
