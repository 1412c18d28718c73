"""A training script launched by torchrun in tests/test_multinode.py (two "nodes" on loopback).

Every rank builds the same rewritten model from the same arguments, wraps it in DDP with
the sampled all-reduce hook and trains a few steps on its own data; it writes what it saw
to ``$OUT/rank<RANK>.json``. ``--budget-on-rank1`` gives rank 1 another plan, which
``register()`` must refuse on every rank before the first step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget-on-rank1", type=float, default=0.4)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT (from the rendezvous): env:// reads them
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank = dist.get_rank()
    result: dict = {"rank": rank, "world": dist.get_world_size(), "group_rank": os.environ["GROUP_RANK"]}
    try:
        import approxcompile.distributed as adist
        from tests.ddp_workers import _batch, _model

        fast = _model(budget=args.budget_on_rank1 if rank == 1 else 0.4)
        ddp = DistributedDataParallel(fast)
        stats = adist.register(ddp)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        for step in range(args.steps):
            x, y = _batch(rank, step)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
        flat = torch.cat([p.detach().flatten() for p in fast.parameters()])
        everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, flat)
        result.update(
            compressed=list(stats.compressed),
            fraction=stats.last_fraction,
            params_identical=all(torch.equal(everyone[0], f) for f in everyone),
        )
    except Exception as e:
        result.update(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc())
    args.out.joinpath(f"rank{rank}.json").write_text(json.dumps(result))
    if "error" in result:
        # The ranks stopped at the plan check, each at its own point of the collective that
        # found the mismatch; tearing gloo down from there can abort in C++ (SIGABRT) while the
        # other rank closes its pairs. The result is written: leave without the teardown.
        sys.stdout.flush()
        os._exit(0)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
