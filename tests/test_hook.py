"""The DDP communication hook's arithmetic, in one process: two ranks simulated, no process group.

``dist.all_reduce`` is replaced by a stand-in that sums what every simulated rank hands it
(as gloo does), so the hook's packing, averaging and unpacking are checked against a plain
average of the two ranks' full gradients computed here.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import approxcompile
from approxcompile import distributed
from approxcompile.ops import shared
from tests.models import mlp

WORLD = 2


class _Work:
    def __init__(self, fut: torch.futures.Future) -> None:
        self._fut = fut

    def get_future(self) -> torch.futures.Future:
        return self._fut


class _AllReduce:
    """Sums the tensors of WORLD calls in place, then completes every caller's future."""

    def __init__(self) -> None:
        self.pending: list[tuple[torch.Tensor, torch.futures.Future]] = []
        self.calls: list[torch.Tensor] = []

    def __call__(self, t: torch.Tensor, group: Any = None, async_op: bool = False) -> _Work:
        fut: torch.futures.Future = torch.futures.Future()
        self.pending.append((t, fut))
        self.calls.append(t.clone())
        if len(self.pending) == WORLD:
            total = torch.stack([p for p, _ in self.pending]).sum(0)
            for p, f in self.pending:
                p.copy_(total)
                f.set_result([p])
            self.pending = []
        return _Work(fut)


class _Bucket:
    """The parts of ``dist.GradBucket`` the hook reads: one bucket holding every gradient."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self._params = params
        self._buffer = torch.cat([p.grad.reshape(-1) for p in params]).clone()

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def parameters(self) -> list[torch.nn.Parameter]:
        return self._params

    def is_last(self) -> bool:
        return True

    def index(self) -> int:
        return 0


class _DDP(DistributedDataParallel):
    """A DistributedDataParallel that skips DDP's own set-up (no process group is needed)."""

    def __init__(self, module: torch.nn.Module) -> None:
        torch.nn.Module.__init__(self)
        self.module = module
        self.hook: Any = None

    def register_comm_hook(self, state: Any, hook: Any) -> None:
        self.hook = (state, hook)


@pytest.fixture
def fake_dist(monkeypatch: pytest.MonkeyPatch) -> _AllReduce:
    ranks = iter(range(WORLD))
    reduce = _AllReduce()
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda group=None: WORLD)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda group=None: next(ranks))
    monkeypatch.setattr(
        distributed.dist,
        "all_gather_object",
        lambda out, obj, group=None: out.__setitem__(slice(None), [obj] * WORLD),
    )
    monkeypatch.setattr(distributed.dist, "all_reduce", reduce)
    return reduce


def _rank(method: str) -> tuple[_DDP, distributed.CommStats]:
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    cfg = approxcompile.ApproxConfig(scores="weights", method=method)
    ddp = _DDP(approxcompile.optimize(mlp(), 0.4, example_inputs=(x,), config=cfg))
    stats = distributed.register(ddp, process_group="fake")  # type: ignore[arg-type]
    return ddp, stats


def _step(ddps: list[_DDP]) -> list[_Bucket]:
    """Each rank trains on its own batch; returns each rank's bucket of local gradients."""
    buckets = []
    for r, ddp in enumerate(ddps):
        g = torch.Generator().manual_seed(100 + r)
        ddp.module.train()
        ddp.module(torch.randn(8, 64, generator=g)).pow(2).sum().backward()
        buckets.append(_Bucket(list(ddp.module.parameters())))
    return buckets


def _offset(params: dict[str, torch.nn.Parameter], name: str) -> int:
    """Where ``name`` starts in a bucket holding every parameter in order."""
    at = 0
    for n, p in params.items():
        if n == name:
            return at
        at += p.numel()
    raise KeyError(name)


@pytest.mark.parametrize("method", ["topk", "bernoulli"])
def test_hook_result_is_the_average_of_every_ranks_full_gradient(fake_dist: _AllReduce, method: str) -> None:
    ranks = [_rank(method) for _ in range(WORLD)]
    ddps = [d for d, _ in ranks]
    try:
        buckets = _step(ddps)
        local = [b.buffer().clone() for b in buckets]
        futures = [ddp.hook[1](ddp.hook[0], b) for ddp, b in zip(ddps, buckets, strict=True)]
        results = [f.wait() for f in futures]
        want = (local[0] + local[1]) / 2
        for got in results:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        # the compressed weights really were cut: something went over the wire for each rank,
        # and it is smaller than the bucket (the unsampled columns stay home)
        stats = ranks[0][1]
        assert stats.compressed == ("layers.1.weight", "layers.2.weight")
        sent = fake_dist.calls[0].numel()
        assert sent < local[0].numel()
        # the bytes: every parameter in full except the two 128x128 weights, which send their
        # sampled columns only, plus one checksum entry
        params = dict(ddps[0].module.named_parameters())
        full = sum(p.numel() for n, p in params.items() if n not in stats.compressed)
        if method == "topk":  # exactly k = 32 of 128 columns (the plan at budget 0.4), 128 rows each
            ks = {n.name: n.k for n in approxcompile.report(ddps[0].module).nodes}
            assert ks["layers.1"] == ks["layers.2"] == 32
            assert sent == full + 2 * 128 * 32 + 1
        for name in stats.compressed:  # unsampled columns come back zero on every rank
            view = results[0][_offset(params, name) : _offset(params, name) + 128 * 128].view(128, 128)
            assert int((view != 0).any(0).sum()) <= (sent - full - 1) // 128
        assert stats.last_sent_bytes == 4 * sent and stats.last_dense_bytes == 4 * local[0].numel()
        assert stats.steps == 1 and stats.last_fraction == sent / local[0].numel()
    finally:
        for ddp, _ in ranks:
            for p in ddp.module.parameters():
                shared.unwatch(p)


def test_hook_fails_the_step_when_ranks_sampled_different_slices(fake_dist: _AllReduce) -> None:
    ranks = [_rank("topk") for _ in range(WORLD)]
    ddps = [d for d, _ in ranks]
    try:
        buckets = _step(ddps)
        w1 = ddps[1].module.get_parameter("layers.1.weight")
        taken = shared.take(w1)
        assert taken is not None
        shared.record(w1, (taken + 1) % 128)  # as many columns as rank 0, but other ones
        futures = [ddp.hook[1](ddp.hook[0], b) for ddp, b in zip(ddps, buckets, strict=True)]
        for f in futures:
            # torch.futures wraps an error raised in a callback in a RuntimeError naming it
            with pytest.raises(
                RuntimeError, match="DistributedError: .*ranks sampled different slices in bucket 0"
            ):
                f.wait()
    finally:
        for ddp, _ in ranks:
            for p in ddp.module.parameters():
                shared.unwatch(p)


def test_hook_fails_the_step_when_two_weights_swap_their_slices(fake_dist: _AllReduce) -> None:
    # The checksum folds the weights' indices in bucket order: rank 1 taking layers.2's columns
    # for layers.1 and layers.1's for layers.2 sends as many numbers and the same index sums,
    # and must still fail the step.
    ranks = [_rank("topk") for _ in range(WORLD)]
    ddps = [d for d, _ in ranks]
    try:
        buckets = _step(ddps)
        w1 = ddps[1].module.get_parameter("layers.1.weight")
        w2 = ddps[1].module.get_parameter("layers.2.weight")
        i1, i2 = shared.take(w1), shared.take(w2)
        assert i1 is not None and i2 is not None and not torch.equal(i1, i2)
        shared.record(w1, i2)
        shared.record(w2, i1)
        futures = [ddp.hook[1](ddp.hook[0], b) for ddp, b in zip(ddps, buckets, strict=True)]
        for f in futures:
            with pytest.raises(RuntimeError, match="ranks sampled different slices in bucket 0"):
                f.wait()
    finally:
        for ddp, _ in ranks:
            for p in ddp.module.parameters():
                shared.unwatch(p)


def test_comm_stats_count_steps_buckets_and_bytes() -> None:
    stats = distributed.CommStats(world_size=2, compressed=())
    assert stats.last_fraction == 1.0  # nothing sent yet
    stats._add(100, 40, False)
    assert (stats.steps, stats.last_buckets, stats.dense_bytes) == (0, 0, 0)  # the step is not over
    stats._add(50, 50, True)  # two buckets: 150 dense bytes, 90 sent
    assert (stats.steps, stats.last_buckets, stats.last_dense_bytes, stats.last_sent_bytes) == (1, 2, 150, 90)
    assert stats.last_fraction == 0.6
    stats._add(10, 5, True)  # a one-bucket step
    assert (stats.steps, stats.last_buckets, stats.dense_bytes, stats.sent_bytes) == (2, 1, 160, 95)
    assert stats.last_fraction == 0.5
