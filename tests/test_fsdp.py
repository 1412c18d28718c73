"""FSDP2 (``fully_shard``) on the rewritten model: 2 gloo ranks on loopback.

Whole model and per block (approxcompile.fsdp.shard_blocks), each against single-process
training on the same global batch; a torch.distributed.checkpoint save loaded back into the
plain model; the sampled reduce-scatter sending fewer elements with the same result.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import approxcompile
from approxcompile.distributed import DistributedError
from approxcompile.fsdp import split_blocks
from tests import ddp_workers
from tests.models import MLP, mlp

DEADLINE_S = 90.0


def _launch(tmp_path: Path, **kw) -> list[dict]:
    results = ddp_workers.launch("tests.fsdp_workers:train", 2, tmp_path, deadline_s=DEADLINE_S, **kw)
    for r in results:
        assert not r["hung"] and "error" not in r, r.get("trace", r)
    return results


def _check_matches_single_process(r: dict) -> None:
    assert r["sampled_nodes"] == 2  # the rewrite happened: layers.1 and layers.2 are sampled
    assert r["keys_equal"]
    assert r["moved"] > 1e-3  # training changed the weights...
    assert r["max_diff"] < 1e-5  # ...exactly as one process on the global batch did


@pytest.mark.slow
def test_whole_model_matches_single_process_and_checkpoints_load_into_the_plain_model(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    for r in _launch(tmp_path, mode="whole", save_to=str(tmp_path)):
        _check_matches_single_process(r)
    plain = MLP()
    state = {"model": plain.state_dict()}
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"))  # no process group: one reader
    plain.load_state_dict(state["model"])
    reference = torch.load(tmp_path / "reference.pt")
    for name, p in plain.named_parameters():
        assert torch.equal(p.detach(), reference[name]) or (p - reference[name]).abs().max() < 1e-5, name


@pytest.mark.slow
def test_per_block_sharding_with_the_sampled_reduce_scatter_matches_single_process(tmp_path: Path) -> None:
    for r in _launch(tmp_path, mode="blocks", compress=True):
        _check_matches_single_process(r)  # per block, and the compact reduce-scatter is exact
        assert r["pieces"] == 4  # one FSDP unit per layer
        first, *later = r["fractions"]
        assert first == 1.0  # step 1: FSDP creates the gathered weights, nothing recorded yet
        # then the sampled columns alone: exactly the plan's kept columns (topk)
        assert later == [pytest.approx(r["expected_fraction"], abs=1e-12)] * len(later)
        assert r["expected_fraction"] < 0.6


def _fast() -> torch.fx.GraphModule:
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    config = approxcompile.ApproxConfig(scores="weights")
    return approxcompile.optimize(mlp(), 0.4, example_inputs=(x,), config=config)


def test_split_blocks_keeps_parameters_outputs_and_sampled_calls() -> None:
    fast = _fast()
    split = split_blocks(fast, ["layers.0", "layers.1", "layers.2", "layers.3"])
    pieces = [m for name, m in split.named_children() if name.startswith("submod_")]
    assert len(pieces) == 4
    inside = [n for m in pieces for n in m.graph.nodes if n.target is approxcompile.sampled_linear]
    assert len(inside) == 2
    assert {id(p) for p in split.parameters()} == {id(p) for p in fast.parameters()}  # shared, not copied
    x = torch.randn(8, 64)
    fast.eval(), split.eval()
    assert torch.equal(fast(x), split(x))


class Reuse(torch.nn.Module):
    """Layer ``a`` runs twice, around ``b``: its weight is read again after ``b``'s block started."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(torch.relu(self.b(torch.relu(self.a(x)))))


def test_split_blocks_refuses_unknown_interleaved_and_tied_blocks() -> None:
    from tests.test_distributed import Tied

    with pytest.raises(DistributedError, match="not submodules of the rewritten model"):
        split_blocks(_fast(), ["layers.0", "blocks.1"])
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    cfg = approxcompile.ApproxConfig(scores="weights", exclude_first_last=False)
    reuse = approxcompile.optimize(Reuse(), 0.8, example_inputs=(x,), config=cfg)
    with pytest.raises(DistributedError, match="after a later block started"):
        split_blocks(reuse, ["a", "b"])
    cfg = approxcompile.ApproxConfig(scores="weights", exclude_first_last=False)
    tied = approxcompile.optimize(Tied(), 0.5, example_inputs=(x,), config=cfg)
    with pytest.raises(DistributedError, match="tied"):
        split_blocks(tied, ["a", "b", "c", "d"])
