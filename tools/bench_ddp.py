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

``--link 1gbit,10gbit,unlimited`` runs the ranks inside a private network namespace whose
loopback is rate-limited (tools/netns.py): within each round, every link speed in turn (the
start rotates) and every variant at that speed, so one run compares them all under the same
load. Without a namespace (not permitted here, ``tc`` missing) it exits 77 with the reason.

    .venv/bin/python tools/bench_ddp.py                          # 2 and 4 ranks, defaults
    .venv/bin/python tools/bench_ddp.py --world 2 --steps 3 --rounds 1 --sizes 784,512,512,10  # smoke
    .venv/bin/python tools/bench_ddp.py --link unlimited,10gbit,1gbit  # bandwidth-limited
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
# tools/ is not a package: its scripts import each other from this directory (spawned ranks too).
sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]
import netns  # noqa: E402

VARIANTS = ("exact", "approx", "approx+hook")
HOST = "host loopback"  # the label when --link is not given: no namespace, no shaping


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
    links = args.link or [HOST]
    times: dict[str, dict[str, list[float]]] = {link: {v: [] for v in VARIANTS} for link in links}
    losses: dict[str, float] = {}
    qdiscs: dict[str, str] = {}  # what tc reported after shaping, per link

    def shape(link: str) -> None:
        if link == HOST:
            return
        dist.barrier()  # nobody is mid-step while the qdisc changes
        if rank == 0:
            netns.set_rate(netns.parse_rate(link))
            qdiscs[link] = netns.qdisc()
        dist.barrier()

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

    shape(links[0])
    for name in VARIANTS:
        for _ in range(args.warmup):
            step(name)
    for r in range(args.rounds):
        for i in range(len(links)):
            link = links[(r + i) % len(links)]
            shape(link)
            for j in range(len(VARIANTS)):
                name = VARIANTS[(r + j) % len(VARIANTS)]
                for _ in range(args.steps):
                    dist.barrier()
                    t0 = time.perf_counter()
                    losses[name] = step(name)
                    times[link][name].append(time.perf_counter() - t0)
    if rank == 0:
        result = {
            "world": world,
            "links": links,
            "qdisc": qdiscs,
            "step_ms": {
                link: {v: 1000 * statistics.median(times[link][v]) for v in VARIANTS} for link in links
            },
            "bytes_per_step": {
                "exact": dense_bytes,
                "approx": dense_bytes,
                "approx+hook": stats.last_sent_bytes,
            },
            "hook_dense_bytes": stats.last_dense_bytes,
            "compressed": list(stats.compressed),
            "last_loss": losses,
            "steps_timed": len(times[links[0]]["exact"]),
        }
        Path(out).write_text(json.dumps(result))
    # Tear down together: a rank that destroys its group and exits while the other is still
    # in its last collective can kill that rank's gloo thread (std::terminate, exit -6; seen
    # in about 1 run in 14 of the smoke test).
    dist.barrier()
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
    """One row per (ranks, link): median step times, and each variant's speedup over exact DDP."""
    lines = [
        "| ranks | link | exact ms | approx ms | approx+hook ms | approx vs exact | hook vs exact "
        "| hook vs approx |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for link in r["links"]:
            t = r["step_ms"][link]
            lines.append(
                f"| {r['world']} | {link} | {t['exact']:.1f} | {t['approx']:.1f} | {t['approx+hook']:.1f} | "
                f"{t['exact'] / t['approx']:.2f}x | {t['exact'] / t['approx+hook']:.2f}x | "
                f"{t['approx'] / t['approx+hook']:.2f}x |"
            )
    return "\n".join(lines)


def _bytes_table(results: list[dict[str, Any]]) -> str:
    lines = ["| ranks | variant | MB reduced/step/rank | vs exact | last loss |", "|---|---|---|---|---|"]
    for r in results:
        for v in VARIANTS:
            b = r["bytes_per_step"][v]
            lines.append(
                f"| {r['world']} | {v} | {b / 2**20:.2f} | {b / r['bytes_per_step']['exact']:.3f} | "
                f"{r['last_loss'][v]:.3f} |"
            )
    return "\n".join(lines)


def fit_link_cost(result: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Per variant, least squares ``step_s = c + s / rate`` over the shaped links.

    ``c`` (seconds) is what does not depend on the link (compute, latency), ``s`` (bits) what
    the step pushes through the shared link. Needs two or more finite link speeds.
    """
    rated = [(netns.parse_rate(link), link) for link in result["links"] if link != HOST]
    points = [(1.0 / rate, link) for rate, link in rated if rate is not None]
    fits = {}
    if len(points) < 2:
        return fits
    for v in VARIANTS:
        xs = [x for x, _ in points]
        ys = [result["step_ms"][link][v] / 1000 for _, link in points]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
        fits[v] = (my - slope * mx, slope)
    return fits


def _crossover(results: list[dict[str, Any]]) -> str:
    """Where communication stops mattering, from the fitted ``c + s / rate`` lines."""
    lines = []
    for r in results:
        fits = fit_link_cost(r)
        if not fits:
            continue
        (ce, se), (ca, sa), (ch, sh) = (fits[v] for v in VARIANTS)
        lines.append(
            f"{r['world']} ranks: fitted step = c + s/rate: "
            + "; ".join(f"{v} c={c * 1e3:.0f} ms, s={s / 8 / 2**20:.1f} MB" for v, (c, s) in fits.items())
        )
        # exact DDP spends as long on the link as on everything else at rate s/c
        lines.append(f"  exact DDP's link time equals its other time at {se / ce / 1e9:.2f} Gbit/s")
        # the hook's gain over sampled+default all-reduce drops under 10% above this rate
        if sa > sh and 0.9 * sa - sh > 0:
            rate = (0.9 * sa - sh) / (0.1 * ca)
            lines.append(
                f"  the hook saves >= 10% over sampled + default all-reduce below {rate / 1e9:.2f} Gbit/s"
            )
    return "\n".join(lines)


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    """Step time against link speed, one panel per rank count; unlimited as dotted lines."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.6 * len(results), 3.4), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        rated = sorted(
            (netns.parse_rate(link), link) for link in r["links"] if link not in (HOST, "unlimited")
        )
        for i, v in enumerate(VARIANTS):
            color = f"C{i}"
            label = {"approx": "sampled", "approx+hook": "sampled + hook"}.get(v, "exact DDP")
            ax.plot(
                [rate / 1e9 for rate, _ in rated],
                [r["step_ms"][link][v] for _, link in rated],
                "o-",
                color=color,
                label=label,
            )
            if "unlimited" in r["links"]:
                ax.axhline(r["step_ms"]["unlimited"][v], color=color, ls=":", lw=1)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("link speed, Gbit/s (dotted: unlimited loopback)")
        ax.set_ylabel("step time, ms (median)")
        ax.set_title(f"{r['world']} ranks, one shared link", fontsize=10)
        ax.legend(fontsize=8)
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
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant per round (and link)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--link",
        type=lambda s: [part.strip() for part in s.split(",") if part.strip()],
        help="comma-separated link speeds (e.g. unlimited,10gbit,1gbit): rate-limit a private loopback",
    )
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds before a run is killed")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--plot", type=Path, help="write a PNG chart here")
    args = ap.parse_args(argv)
    if args.link:
        for link in args.link:
            try:
                netns.parse_rate(link)
            except ValueError as e:
                ap.error(str(e))
        if not netns.inside():  # run this same command again inside a namespace of its own
            return netns.reexec_in_netns(
                [str(Path(__file__).resolve()), *(sys.argv[1:] if argv is None else argv)]
            )
        netns.bring_up_loopback()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_ddp_{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    load = [os.getloadavg()]
    results = []
    for world in args.world:
        print(f"running {world} ranks ...", file=sys.stderr, flush=True)
        results.append(_run(world, args, tmp))
    load.append(os.getloadavg())
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    print(
        f"machine: {machine}; MLP {args.sizes}, batch {args.batch}/rank, budget {args.budget}, {args.method}"
    )
    print(f"load average (1/5/15 min) at start {load[0]}, at end {load[1]}")
    print(f"compressed weights: {', '.join(results[0]['compressed'])}")
    print(_bytes_table(results))
    print()
    print(_table(results))
    crossover = _crossover(results)
    if crossover:
        print()
        print(crossover)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"json": None, "plot": None},
                    "machine": machine,
                    "load_average": load,
                    "fits": {r["world"]: fit_link_cost(r) for r in results},
                    "results": results,
                },
                indent=2,
            )
        )
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        _plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
