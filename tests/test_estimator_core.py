"""Runtime ops and their export twins share one estimator core: fed the same noise, they agree."""

import pytest
import torch

from approxcompile import kinds
from approxcompile.choices import METHODS
from approxcompile.export import estimators
from approxcompile.ops import estimator
from approxcompile.ops.sampling import sample_pairs
from approxcompile.plan import kept_count


def _noise(method: str, n: int, keep: float, seed: int) -> torch.Tensor:
    size = estimator.noise_size(method, n, kept_count(keep, n))
    return torch.rand(size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", METHODS)
def test_same_noise_same_pairs_and_scales(method: str) -> None:
    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        scores = torch.rand(64, generator=g) * (torch.rand(64, generator=g) > 0.3)
        noise = _noise(method, 64, 0.25, trial)
        index, scale = sample_pairs(scores, 16, method, noise=noise)
        twin_index, twin_scale = estimators.sample(scores, 16, method, noise=noise)
        assert torch.equal(index, twin_index)
        if method == "topk":
            assert scale is None and twin_scale is None
        else:
            assert scale is not None and twin_scale is not None
            assert torch.equal(scale, twin_scale)
            assert (scale > 0).all()


def test_bernoulli_nothing_drawn_keeps_one_pair_scaled_by_zero() -> None:
    scores = torch.rand(64)
    ones = torch.ones(64)  # u < min(1, k p) never holds for the pairs with k p < 1
    for index, scale in (
        sample_pairs(scores, 4, "bernoulli", noise=ones),
        estimators.sample(scores, 4, "bernoulli", noise=ones),
    ):
        assert index.tolist() == [int(torch.argmax(scores))] and scale is not None
        assert scale.tolist() == [0.0]


def _operands(kind: str) -> tuple[tuple[torch.Tensor, ...], tuple[object, ...], int]:
    """(tensors, trailing positional args, inner size) of one call of ``kind``'s op."""
    g = torch.Generator().manual_seed(2)
    if kind == "linear":
        return (torch.randn(8, 5, 64, generator=g), torch.randn(24, 64, generator=g), torch.randn(24)), (), 64
    if kind == "matmul":
        return (torch.randn(3, 16, 64, generator=g), torch.randn(3, 64, 20, generator=g)), (), 64
    if kind == "addmm":
        return (torch.randn(20), torch.randn(16, 64, generator=g), torch.randn(64, 20, generator=g)), (), 64
    if kind == "baddbmm":
        a, b = torch.randn(3, 16, 64, generator=g), torch.randn(3, 64, 20, generator=g)
        return (torch.randn(3, 1, 20), a, b), (), 64
    if kind == "conv":
        x, w = torch.randn(4, 32, 9, 9, generator=g), torch.randn(8, 32, 3, 3, generator=g)
        return (x, w, torch.randn(8)), (1, 1, 1), 32
    raise AssertionError(f"no example operands for op kind {kind!r}: add them here")


@pytest.mark.parametrize("kind", [k for k, spec in kinds.KINDS.items() if spec.export_twin is not None])
@pytest.mark.parametrize("method", METHODS)
def test_runtime_op_and_export_twin_agree_on_the_same_noise(kind: str, method: str) -> None:
    spec = kinds.KINDS[kind]
    twin = kinds.export_twin(spec)
    assert twin is not None, f"{kind} has no export twin"
    tensors, extra, n = _operands(kind)
    keep = 0.25
    for seed in range(3):
        noise = _noise(method, n, keep, seed)
        leaves = [t.clone().requires_grad_() for t in tensors]
        twin_leaves = [t.clone().requires_grad_() for t in tensors]
        kw = {"keep": keep, "method": method, "training": True, "noise": noise}
        out = spec.forward_op(*leaves, *extra, **kw)
        want = twin(*twin_leaves, *extra, **kw)
        exact = spec.forward_op(*tensors, *extra, keep=keep, training=False)
        assert not torch.allclose(out, exact), "the op must actually sample"
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)
        # The same pairs kept means the same gradients (the export twin's go through GatherND).
        out.square().sum().backward()
        want.square().sum().backward()
        for a, b in zip(leaves, twin_leaves, strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-3)
