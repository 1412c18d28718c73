"""FSDP2 scenarios for tests/test_fsdp.py, run on spawned gloo ranks by ``ddp_workers.launch``.

Each rank trains the rewritten MLP under ``fully_shard`` on its half of a global batch and,
in the same process, a plain (unsharded) copy on the whole global batch: FSDP's averaged
gradients of the per-rank mean losses are the gradients of the global mean loss, so the two
must end with the same weights.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tests.ddp_workers import _batch, _expected_fraction, _model

STEPS = 3


def _full(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered from its shards (a collective), under the plain model's keys."""
    from approxcompile.fsdp import plain_state_dict

    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach()
        for k, v in plain_state_dict(module).items()
    }


def train(
    rank: int, world: int, *, mode: str = "whole", compress: bool = False, save_to: str = ""
) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard

    import approxcompile
    from approxcompile.distributed import compressible_weights
    from approxcompile.fsdp import compress_reduce_scatter, plain_state_dict, shard_blocks

    fast = _model()
    reference = copy.deepcopy(fast)  # one process, the global batch
    sampled = [n for n in fast.graph.nodes if n.target is approxcompile.sampled_linear]
    expected = _expected_fraction(fast, tuple(compressible_weights(fast)), 0)  # before sharding
    if mode == "whole":
        sharded: nn.Module = fully_shard(fast)
    else:
        sharded = shard_blocks(fast, [f"layers.{i}" for i in range(4)])
    pieces = [m for name, m in sharded.named_children() if name.startswith("submod_")]
    stats = compress_reduce_scatter(sharded, fast) if compress else None
    opt = torch.optim.SGD(sharded.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    fractions = []
    for step in range(STEPS):
        x, y = _batch(rank, step)
        before = (stats.dense_elements, stats.sent_elements) if stats is not None else (0, 0)
        opt.zero_grad()
        F.cross_entropy(sharded(x), y).backward()
        opt.step()
        if stats is not None:  # this step's elements sent / FSDP's dense reduce-scatter
            fractions.append((stats.sent_elements - before[1]) / (stats.dense_elements - before[0]))
        xs = [_batch(r, step) for r in range(world)]
        ref_opt.zero_grad()
        F.cross_entropy(reference(torch.cat([b[0] for b in xs])), torch.cat([b[1] for b in xs])).backward()
        ref_opt.step()
    full = _full(sharded)
    want = dict(reference.named_parameters())
    result: dict[str, Any] = {
        "sampled_nodes": len(sampled),
        "pieces": len(pieces),
        "keys_equal": sorted(full) == sorted(want),
        "max_diff": max(float((full[k] - want[k].detach()).abs().max()) for k in want),
        "moved": max(float((want[k] - p.detach()).abs().max()) for k, p in _model().named_parameters()),
        "fractions": fractions,
        "expected_fraction": expected,
    }
    if save_to:
        dcp.save({"model": plain_state_dict(sharded)}, checkpoint_id=str(Path(save_to, "ckpt")))
        if rank == 0:
            torch.save({k: v.detach() for k, v in want.items()}, Path(save_to, "reference.pt"))
    dist.barrier()
    return result
