"""Data-parallel benchmark: bytes all-reduced and step time, exact DDP vs approximated DDP (issue 6).

Spawns W ranks (gloo on loopback, CPU, one torch thread each) for each ``--world`` W. Every
rank builds three variants of an MLP from the same initial weights:

- ``exact``: the model as written, DDP's default all-reduce;
- ``approx``: ``optimize(model, B, config=ApproxConfig(scores="weights"))``, DDP's default
  all-reduce (the compute saving alone: every gradient still goes through in full);
- ``approx+hook``: the same model with ``approxcompile.distributed.register`` (only the
  sampled gradient columns of the compressed weights are all-reduced).

Each rank trains on its own shard of the 5,000-image MNIST subset (batch B per rank) with
SGD(lr=0.05). Warm-up steps first, then ROUNDS rounds in which every variant runs STEPS
steps in turn (the start rotates), so load from other processes hits all variants alike.
Step time: rank 0's median wall time of one full step (zero_grad, forward, loss, backward
with its all-reduce, optimizer step). Bytes: the payload each rank hands to all-reduce per
step (the hook's own count for ``approx+hook``, the size of every gradient otherwise); a
ring all-reduce sends about 2(W-1)/W times that over the wire per rank.

    .venv/bin/python tools/bench_ddp.py                          # 2 and 4 ranks, defaults
    .venv/bin/python tools/bench_ddp.py --world 2 --steps 3 --rounds 1 --sizes 784,512,512,10  # smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("exact", "approx", "approx+hook")


class MLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    from image_data import load_mnist_5k

    import approxcompile
    import approxcompile.distributed as adist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    data = load_mnist_5k(seed=0)
    x_all, y_all = data.x_train[rank::world].flatten(1), data.y_train[rank::world]
    sizes = tuple(int(s) for s in args.sizes.split(","))
    torch.manual_seed(0)
    base = MLP(sizes)
    example = (data.x_train[: args.batch].flatten(1),)  # the same on every rank, so is the plan
    cfg = approxcompile.ApproxConfig(scores="weights", method=args.method)
    models: dict[str, nn.Module] = {"exact": base}
    for name in ("approx", "approx+hook"):
        torch.manual_seed(0)
        models[name] = approxcompile.optimize(MLP(sizes), args.budget, example_inputs=example, config=cfg)
    ddps = {name: DistributedDataParallel(m) for name, m in models.items()}
    stats = adist.register(ddps["approx+hook"])
    opts = {name: torch.optim.SGD(d.parameters(), lr=0.05) for name, d in ddps.items()}
    dense_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    losses: dict[str, float] = {}
    cursor = {v: 0 for v in VARIANTS}

    def step(name: str) -> float:
        i = cursor[name] % (len(x_all) // args.batch)
        cursor[name] += 1
        xb, yb = x_all[i * args.batch : (i + 1) * args.batch], y_all[i * args.batch : (i + 1) * args.batch]
        opts[name].zero_grad()
        loss = F.cross_entropy(ddps[name](xb), yb)
        loss.backward()
        opts[name].step()
        return float(loss.detach())

    for name in VARIANTS:
        for _ in range(args.warmup):
            step(name)
    for r in range(args.rounds):
        for j in range(len(VARIANTS)):
            name = VARIANTS[(r + j) % len(VARIANTS)]
            for _ in range(args.steps):
                dist.barrier()
                t0 = time.perf_counter()
                losses[name] = step(name)
                times[name].append(time.perf_counter() - t0)
    if rank == 0:
        result = {
            "world": world,
            "step_ms": {v: 1000 * statistics.median(times[v]) for v in VARIANTS},
            "bytes_per_step": {
                "exact": dense_bytes,
                "approx": dense_bytes,
                "approx+hook": stats.last_sent_bytes,
            },
            "hook_dense_bytes": stats.last_dense_bytes,
            "compressed": list(stats.compressed),
            "last_loss": losses,
            "steps_timed": len(times["exact"]),
        }
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def _run(world: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = tmp / f"ddp_{world}.json"
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, str(out))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + args.timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    if not out.exists() or any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"bench_ddp: the {world}-rank run failed (exit codes {[p.exitcode for p in procs]})")
    return json.loads(out.read_text())


def _table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| ranks | variant | MB reduced/step/rank | vs exact | step ms (median) | speedup | last loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for v in VARIANTS:
            b, t = r["bytes_per_step"][v], r["step_ms"][v]
            lines.append(
                f"| {r['world']} | {v} | {b / 2**20:.2f} | {b / r['bytes_per_step']['exact']:.3f} | "
                f"{t:.1f} | {r['step_ms']['exact'] / t:.2f}x | {r['last_loss'][v]:.3f} |"
            )
    return "\n".join(lines)


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    width = 0.8 / len(VARIANTS)
    for i, v in enumerate(VARIANTS):
        xs = [j + i * width for j in range(len(results))]
        axes[0].bar(xs, [r["bytes_per_step"][v] / 2**20 for r in results], width, label=v)
        axes[1].bar(xs, [r["step_ms"][v] for r in results], width, label=v)
    for ax, title in zip(axes, ("MB all-reduced per step per rank", "step time, ms (median)"), strict=True):
        ax.set_xticks([j + width for j in range(len(results))], [f"{r['world']} ranks" for r in results])
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4], help="rank counts to run")
    ap.add_argument("--sizes", default="784,2048,2048,2048,10", help="MLP layer widths")
    ap.add_argument("--batch", type=int, default=64, help="batch per rank")
    ap.add_argument("--budget", type=float, default=0.4)
    ap.add_argument("--method", default="topk")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds before a run is killed")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--plot", type=Path, help="write a PNG bar chart here")
    args = ap.parse_args(argv)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_ddp_{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    results = []
    for world in args.world:
        print(f"running {world} ranks ...", file=sys.stderr, flush=True)
        results.append(_run(world, args, tmp))
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    print(
        f"machine: {machine}; MLP {args.sizes}, batch {args.batch}/rank, budget {args.budget}, {args.method}"
    )
    print(f"compressed weights: {', '.join(results[0]['compressed'])}")
    print(_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": None, "plot": None}, "machine": machine, "results": results},
                indent=2,
            )
        )
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        _plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
