"""``weight_norms_every``: a weight's column (channel) norms reused until it has been updated N times."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import approxcompile
from approxcompile import ApproxConfig
from approxcompile.export.lower import lower_for_export
from approxcompile.ops import sampled_conv, sampled_linear
from approxcompile.ops.kernels import column_squares, weight_norms


def _counting(
    fn: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[int]]:
    calls: list[int] = []

    def counted(t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return fn(t)

    return counted, calls


@pytest.mark.parametrize("every", [1, 3])
def test_norms_are_recomputed_after_every_updates_of_the_weight(every: int) -> None:
    w = torch.randn(4, 6)
    norms, calls = _counting(column_squares)
    first = weight_norms(w, every, norms)
    assert len(calls) == 1
    weight_norms(w, every, norms)  # no update in between: never recomputed when cached
    assert len(calls) == (1 if every > 1 else 2)
    for update in range(1, 4):
        w.add_(1.0)  # what an optimizer step does to the version counter
        got = weight_norms(w, every, norms)
        fresh = update % every == 0 or every == 1
        if every > 1:
            assert len(calls) == 1 + update // every
            torch.testing.assert_close(got, column_squares(w) if fresh else first)
    assert len(calls) == (5 if every == 1 else 2)


def test_traced_weights_always_recompute() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    norms, calls = _counting(column_squares)
    with FakeTensorMode() as mode:
        w = mode.from_tensor(torch.randn(4, 6))
        weight_norms(w, 5, norms)
        weight_norms(w, 5, norms)
    assert len(calls) == 2


def _kept_columns(w: torch.Tensor) -> list[int]:
    assert w.grad is not None
    return torch.nonzero(w.grad.abs().sum(0)).squeeze(1).tolist()


@pytest.mark.parametrize("scores", ["activations", "weights"])
def test_topk_keeps_picking_by_the_reused_norms_until_they_are_renewed(scores: str) -> None:
    """Column 0 grows large in place: picked at once with every=1, only after 3 updates with every=3."""
    x = torch.ones(2, 8)
    w = torch.arange(1.0, 9.0).repeat(4, 1).requires_grad_(True)  # column i has norm 2 * (i + 1)

    def step(every: int) -> list[int]:
        w.grad = None
        sampled_linear(x, w, keep=0.25, scores=scores, weight_norms_every=every).sum().backward()
        return _kept_columns(w)

    assert step(3) == [6, 7]
    with torch.no_grad():
        w[:, 0].mul_(100.0)  # update 1 (one in-place write: one version)
    assert step(1) == [0, 7]  # fresh norms
    assert step(3) == [6, 7]  # the norms from before the update
    with torch.no_grad():
        w.add_(0.0)  # update 2
    assert step(3) == [6, 7]
    with torch.no_grad():
        w.add_(0.0)  # update 3: renewed
    assert step(3) == [0, 7]


def test_conv_reuses_its_channel_norms_alike() -> None:
    x = torch.ones(1, 8, 3, 3)
    w = torch.arange(1.0, 9.0).view(1, 8, 1, 1).repeat(2, 1, 3, 3).requires_grad_(True)

    def step(every: int) -> list[int]:
        w.grad = None
        sampled_conv(x, w, None, 1, 1, keep=0.25, weight_norms_every=every).sum().backward()
        assert w.grad is not None
        return torch.nonzero(w.grad.abs().sum((0, 2, 3))).squeeze(1).tolist()

    assert step(2) == [6, 7]
    with torch.no_grad():
        w[:, 0].mul_(100.0)
    assert step(2) == [6, 7]
    assert step(1) == [0, 7]
    with torch.no_grad():
        w.add_(0.0)
    assert step(2) == [0, 7]


def test_the_config_reaches_the_sampled_calls_and_export_drops_it() -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )
    x = torch.randn(16, 64)
    config = ApproxConfig(exclude_first_last=False, weight_norms_every=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = approxcompile.optimize(model, 0.5, example_inputs=(x,), config=config)
    calls = [n for n in fast.graph.nodes if n.target is sampled_linear]
    assert calls and all(n.kwargs["weight_norms_every"] == 4 for n in calls)
    default = approxcompile.optimize(
        model, 0.5, example_inputs=(x,), config=ApproxConfig(exclude_first_last=False)
    )
    assert all(
        "weight_norms_every" not in n.kwargs for n in default.graph.nodes if n.target is sampled_linear
    )
    lowered = lower_for_export(fast).module
    assert all("weight_norms_every" not in n.kwargs for n in lowered.graph.nodes if n.op == "call_function")
    fast.eval()
    torch.testing.assert_close(fast(x), model(x))  # eval stays exact
    fast.train()
    F.cross_entropy(fast(x), torch.zeros(16, dtype=torch.long)).backward()


def test_bad_values_fail_where_they_are_made() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="weight_norms_every"):
            ApproxConfig(weight_norms_every=bad)  # type: ignore[arg-type]
    assert ApproxConfig.from_dict(ApproxConfig(weight_norms_every=5).to_dict()).weight_norms_every == 5
    assert "weight_norms_every=5" in repr(ApproxConfig(weight_norms_every=5))
