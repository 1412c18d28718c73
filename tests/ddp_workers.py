"""Worker processes for tests/test_distributed.py (spawned, so they live in an importable module).

Each worker joins a gloo process group on loopback, runs one scenario and writes what it saw
to ``<out>/rank<r>.json``; an exception is written there too, so the test can assert on it.
"""

from __future__ import annotations

import copy
import datetime
import importlib
import json
import multiprocessing as mp
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

TIMEOUT_S = 20  # every collective fails after this instead of hanging


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(scenario: str, world: int, out: Path, *, deadline_s: float = 90.0, **kw: Any) -> list[dict]:
    """Run ``scenario`` on ``world`` spawned ranks; kill any left after ``deadline_s``."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_main, args=(r, world, port, scenario, str(out), kw)) for r in range(world)]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline_s
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    results = []
    for r in range(world):
        f = out / f"rank{r}.json"
        results.append(
            {
                "exitcode": procs[r].exitcode,
                "hung": r in hung,
                **(json.loads(f.read_text()) if f.exists() else {}),
            }
        )
    return results


def _main(rank: int, world: int, port: int, scenario: str, out: str, kw: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    result: dict[str, Any]
    try:
        timeout = datetime.timedelta(seconds=kw.pop("timeout_s", TIMEOUT_S))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
        result = _scenario(scenario)(rank, world, **kw)
    except Exception as e:
        result = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized() and "error" not in result:
        dist.destroy_process_group()


def _scenario(name: str) -> Any:
    """A scenario below, or ``module:function`` from another workers module (tests/fsdp_workers.py)."""
    if ":" not in name:
        return SCENARIOS[name]
    module, function = name.split(":")
    return getattr(importlib.import_module(module), function)


def _model(budget: float = 0.4, method: str = "topk") -> torch.fx.GraphModule:
    import approxcompile
    from tests.models import mlp

    torch.manual_seed(0)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    cfg = approxcompile.ApproxConfig(scores="weights", method=method)
    return approxcompile.optimize(mlp(), budget, example_inputs=(x,), config=cfg)


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)  # every rank sees different data
    return torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)


def _expected_fraction(fast: torch.fx.GraphModule, compressed: tuple[str, ...], buckets: int) -> float:
    """Bytes the hook should send per step / dense bytes, from the plan's kept counts (topk)."""
    from approxcompile.plan import META_KEY

    plans = {n.name: n for n in fast.meta[META_KEY].nodes}
    total = sum(p.numel() for p in fast.parameters())
    saved = 0
    for name in compressed:
        plan, w = plans[name.rsplit(".", 1)[0]], fast.get_parameter(name)
        saved += w.numel() // w.shape[1] * (plan.inner - plan.k)
    return (total - saved + buckets) / total


def train(rank: int, world: int, *, method: str = "topk", steps: int = 4) -> dict[str, Any]:
    """Hook grads == plain all-reduce of local grads; params identical after ``steps``; bytes."""
    import approxcompile.distributed as adist

    fast = _model(method=method)
    reference = copy.deepcopy(fast)  # same weights, same seeded streams, no DDP
    ddp = DistributedDataParallel(fast)
    stats = adist.register(ddp)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    out: dict[str, Any] = {"compressed": list(stats.compressed)}
    for step in range(steps):
        x, y = _batch(rank, step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        if step == 0:
            reference.zero_grad()
            torch.nn.functional.cross_entropy(reference(x), y).backward()
            diffs, zero_cols = [], 0
            for (name, p), q in zip(fast.named_parameters(), reference.parameters(), strict=True):
                plain = q.grad.clone()
                dist.all_reduce(plain)
                plain /= world
                diffs.append(float((p.grad - plain).abs().max()))
                if name in stats.compressed:
                    zero_cols += int((plain.abs().sum(0) == 0).sum())
            out.update(max_grad_diff=max(diffs), zero_columns=zero_cols)
        opt.step()
        out.setdefault("fractions", []).append(stats.last_fraction)
    out["expected_fraction"] = _expected_fraction(fast, stats.compressed, stats.last_buckets)
    flat = torch.cat([p.detach().flatten() for p in fast.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    out["params_identical"] = all(torch.equal(everyone[0], f) for f in everyone)
    out["params_changed"] = not torch.equal(flat, torch.cat([p.flatten() for p in reference.parameters()]))
    return out


def dies(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 exits after setup; the others must fail their step with a clear error."""
    import approxcompile.distributed as adist

    ddp = DistributedDataParallel(_model())
    adist.register(ddp)
    if rank == 1:
        os._exit(3)
    start = time.monotonic()
    x, y = _batch(rank, 0)
    torch.nn.functional.cross_entropy(ddp(x), y).backward()
    return {"finished_in": time.monotonic() - start}  # not reached when the check works


def stalls(rank: int, world: int, *, stall_s: float = 20.0) -> dict[str, Any]:
    """Rank 1 stays alive but silent; the others must fail once the group's timeout runs out."""
    import approxcompile.distributed as adist

    ddp = DistributedDataParallel(_model())
    adist.register(ddp)
    if rank == 1:
        time.sleep(stall_s)
        os._exit(0)
    start = time.monotonic()
    x, y = _batch(rank, 0)
    try:
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
    except RuntimeError as e:
        return {"error": str(e), "failed_after_s": time.monotonic() - start}
    return {"failed_after_s": None}


def mismatch(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 builds its model with another budget: register() must refuse on every rank."""
    import approxcompile.distributed as adist

    ddp = DistributedDataParallel(_model(budget=0.4 if rank == 0 else 0.6))
    adist.register(ddp)
    return {}


def diverge(rank: int, world: int) -> dict[str, Any]:
    """Rank 1's sampling stream is reseeded: the same plan, other slices; the step must fail."""
    import approxcompile.distributed as adist
    from approxcompile.ops import shared

    fast = _model(method="uniform")
    ddp = DistributedDataParallel(fast)
    stats = adist.register(ddp)
    if rank == 1:
        for name in stats.compressed:
            shared.stream(fast.get_parameter(name), 0)  # create the stream now...
            shared.stream(fast.get_parameter(name), 0).manual_seed(12345)  # ...and knock it off
    x, y = _batch(rank, 0)
    torch.nn.functional.cross_entropy(ddp(x), y).backward()
    return {}


SCENARIOS = {"train": train, "dies": dies, "stalls": stalls, "mismatch": mismatch, "diverge": diverge}
