"""The sampled linear of small layers in plain eager calls (``ops.small``) against the general kernel.

Both must give the same values, bit for bit: the same draw, the same products on the same
slices and the same scatter; only where the memory comes from and what is kept differ.
"""

from __future__ import annotations

import pytest
import torch

from approxcompile.errors import DoubleBackwardError
from approxcompile.ops import sampled_linear, shared, small
from tests import reference

METHODS = ("topk", "crs", "bernoulli", "uniform", "wta_crs")


def _run(
    general: bool,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    x_shape: tuple[int, ...],
    bias: bool,
    x_grad: bool,
) -> tuple[str, list[torch.Tensor | None]]:
    with monkeypatch.context() as m:
        if general:
            m.setattr(small, "SMALL_GRADIENT", 0)
        n, p = x_shape[-1], 12
        g = torch.Generator().manual_seed(0)
        x = torch.randn(x_shape, generator=g).requires_grad_(x_grad)
        w = torch.randn(p, n, generator=g, requires_grad=True)
        b = torch.randn(p, generator=g, requires_grad=True) if bias else None
        y = sampled_linear(x, w, b, keep=0.3, method=method, generator=torch.Generator().manual_seed(5))
        node = type(y.grad_fn).__name__
        y.pow(2).sum().backward()
        return node, [y.detach(), x.grad, w.grad, None if b is None else b.grad]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("x_shape", [(6, 40), (2, 3, 40)])
@pytest.mark.parametrize(("bias", "x_grad"), [(True, True), (False, True), (True, False)])
def test_small_product_equals_the_general_kernel(
    method: str, x_shape: tuple[int, ...], bias: bool, x_grad: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    node, got = _run(False, monkeypatch, method, x_shape, bias, x_grad)
    general, want = _run(True, monkeypatch, method, x_shape, bias, x_grad)
    assert node.startswith("_SmallLinear") and general.startswith("_EagerLinear"), (node, general)
    for a, b in zip(got, want, strict=True):
        if b is None:
            assert a is None
        else:
            assert a is not None
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_small_product_matches_the_dense_reference() -> None:
    """Values against a dense product of the kept pairs (crs: repeated columns add up)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 64, generator=g, requires_grad=True)
    w = torch.randn(10, 64, generator=g, requires_grad=True)
    b = torch.randn(10, generator=g, requires_grad=True)
    g2 = torch.Generator().manual_seed(2)
    sampled_linear(x, w, b, keep=0.25, method="crs", generator=g2).sum().backward()
    got = [t.grad.clone() for t in (x, w, b)]  # type: ignore[union-attr]
    x.grad = w.grad = b.grad = None
    reference.linear(x, w, b, 16, "crs", seed=2).sum().backward()
    for a, want in zip(got, (x.grad, w.grad, b.grad), strict=True):
        torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-5)


def test_what_counts_as_small() -> None:
    x, w = torch.randn(50, 500), torch.randn(500, 500)
    assert small.small(x, w, 250)  # the MNIST MLP's hidden layer at keep 0.5
    assert not small.small(torch.randn(4, 2048), torch.randn(2048, 2048), 16)  # a weight over 4 MB
    assert not small.small(torch.randn(2048, 1024), torch.randn(64, 1024), 8)  # an input gradient over 4 MB
    # products large enough for the general kernel to test dy for dead columns
    assert not small.small(torch.randn(1000, 1000), torch.randn(1000, 1000), 500)


def test_small_topk_records_its_columns_for_the_data_parallel_hook() -> None:
    """The draw of a plain topk call skips the draw op but still files what it kept."""
    x, w = torch.randn(4, 32), torch.randn(8, 32, requires_grad=True)
    shared.watch(w)
    try:
        y = sampled_linear(x, w, keep=0.25)
        y.sum().backward()
        kept = shared.take(w)
        assert kept is not None and kept.numel() == 8
        assert w.grad is not None
        assert torch.equal(torch.nonzero(w.grad.abs().sum(0)).squeeze(1), kept)
        with torch.no_grad():  # no gradient will come of it: nothing recorded
            sampled_linear(x, w, keep=0.25)
        assert shared.take(w) is None
    finally:
        shared.unwatch(w)


def test_small_product_refuses_double_backward() -> None:
    x, w = torch.randn(4, 32, requires_grad=True), torch.randn(8, 32, requires_grad=True)
    y = sampled_linear(x, w, keep=0.25)
    assert type(y.grad_fn).__name__.startswith("_SmallLinear")
    with pytest.raises(DoubleBackwardError):
        torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)


def test_topk_of_squared_scores_ignores_nan_columns() -> None:
    """topk ranks squared norms; a NaN input column still counts as score 0, as before."""
    x = torch.ones(3, 16)
    x[:, 2] = float("nan")
    w = torch.ones(4, 16, requires_grad=True)
    sampled_linear(x, w, keep=0.5).sum().backward()
    assert w.grad is not None
    assert not bool(w.grad[:, 2].isnan().any()) and float(w.grad[:, 2].abs().sum()) == 0.0
