"""The sampled ops: exactness where promised, unbiasedness where promised, shapes anywhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from approxcompile.ops import sample_pairs, sampled_addmm, sampled_conv, sampled_linear, sampled_matmul
from tests import reference

METHODS = ("topk", "crs", "bernoulli", "uniform")
UNBIASED = ("crs", "bernoulli", "uniform")


def _cases() -> dict[str, tuple]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 32, generator=g) * torch.linspace(0.1, 3, 32)  # uneven column norms
    w = torch.randn(8, 32, generator=g)
    a = torch.randn(2, 6, 24, generator=g)
    b = torch.randn(2, 24, 5, generator=g)
    img = torch.randn(2, 12, 6, 6, generator=g)
    kern = torch.randn(4, 12, 3, 3, generator=g)
    bias = torch.randn(5, generator=g)
    return {
        "linear": (lambda keep, **kw: sampled_linear(x, w, None, keep=keep, **kw), F.linear(x, w)),
        "matmul": (lambda keep, **kw: sampled_matmul(a, b, keep=keep, **kw), a @ b),
        "addmm": (
            lambda keep, **kw: sampled_addmm(bias, a[0], b[0], keep=keep, **kw),
            torch.addmm(bias, a[0], b[0]),
        ),
        "conv": (
            lambda keep, **kw: sampled_conv(img, kern, None, 1, 1, 1, keep=keep, **kw),
            F.conv2d(img, kern, None, 1, 1),
        ),
    }


CASES = _cases()


@pytest.mark.parametrize("op", CASES)
@pytest.mark.parametrize("method", METHODS)
def test_eval_and_full_keep_are_exact(op: str, method: str) -> None:
    fn, exact = CASES[op]
    assert torch.equal(fn(0.3, method=method, training=False), exact)
    assert torch.equal(fn(1.0, method=method, training=True), exact)


@pytest.mark.parametrize("op", CASES)
def test_topk_at_ratio_one_half_is_deterministic_and_not_exact(op: str) -> None:
    fn, exact = CASES[op]
    y1, y2 = fn(0.5, method="topk"), fn(0.5, method="topk")
    assert torch.equal(y1, y2)
    assert not torch.allclose(y1, exact)


def _mean_and_var(fn, method: str, draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    samples = torch.stack([fn(0.25, method=method, generator=g) for _ in range(draws)])
    return samples.mean(0), samples.var(0)


@pytest.mark.parametrize("op", CASES)
@pytest.mark.parametrize("method", UNBIASED)
def test_unbiased_methods_average_to_the_exact_product(op: str, method: str) -> None:
    """|mean - exact|^2 has expectation sum(var)/N for an unbiased estimator; allow 3x that.

    2,000 draws with a fixed seed; with hundreds of output entries the ratio concentrates
    near 1, so 3x fails only for a biased estimator (see the topk control below).
    """
    fn, exact = CASES[op]
    draws = 2000
    mean, var = _mean_and_var(fn, method, draws)
    sq_err = float((mean - exact).pow(2).sum())
    assert sq_err < 3.0 * float(var.sum()) / draws, (sq_err, float(var.sum()) / draws)


@pytest.mark.parametrize("op", CASES)
def test_the_unbiasedness_check_catches_a_biased_estimator(op: str) -> None:
    fn, exact = CASES[op]
    # topk is deterministic (zero variance), so any bias fails the same bound
    mean = fn(0.25, method="topk")
    noise_floor = float(_mean_and_var(fn, "uniform", 200)[1].sum()) / 2000
    assert float((mean - exact).pow(2).sum()) > 3.0 * noise_floor


def test_crs_error_matches_the_variance_formula() -> None:
    """E|AB - CR|_F^2 = (1/k)(sum a_i^2 / p_i - |AB|_F^2) for crs (Drineas et al. 2006), within 10%."""
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(16, 40, generator=g), torch.randn(8, 40, generator=g)
    k, eps = 10, 0.1
    a = x.norm(dim=0) * w.norm(dim=0)
    p = (1 - eps) * a / a.sum() + eps / 40
    expected = float(((a**2 / p).sum() - (x @ w.T).pow(2).sum()) / k)
    errs = [
        float((sampled_linear(x, w, keep=k / 40, method="crs", generator=g) - x @ w.T).pow(2).sum())
        for _ in range(3000)
    ]
    assert abs(sum(errs) / len(errs) / expected - 1) < 0.1


def test_randomness_follows_torch_manual_seed() -> None:
    x, w = torch.randn(8, 64), torch.randn(4, 64)
    torch.manual_seed(3)
    y1 = sampled_linear(x, w, keep=0.25, method="crs")
    torch.manual_seed(3)
    y2 = sampled_linear(x, w, keep=0.25, method="crs")
    y3 = sampled_linear(x, w, keep=0.25, method="crs")
    assert torch.equal(y1, y2) and not torch.equal(y2, y3)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "scores", [torch.zeros(10), torch.full((10,), float("nan")), torch.tensor([1.0] + [0.0] * 9)]
)
def test_degenerate_scores_never_divide_by_zero(method: str, scores: torch.Tensor) -> None:
    index, scale = sample_pairs(scores, 4, method)
    assert index.dtype == torch.int64 and bool((index >= 0).all()) and bool((index < 10).all())
    if scale is not None:
        assert bool(torch.isfinite(scale).all())
    x = torch.zeros(3, 10)  # a dead-ReLU activation: every score is zero
    y = sampled_linear(x, torch.randn(2, 10), keep=0.4, method=method)
    assert torch.equal(y, torch.zeros(3, 2))  # finite, and the exact product (0)


def test_bernoulli_keeps_k_in_expectation_at_most() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(200, generator=g)
    counts = [sample_pairs(scores, 50, "bernoulli", generator=g)[0].numel() for _ in range(500)]
    assert 45 <= sum(counts) / len(counts) <= 50


def test_topk_backward_zeroes_unsampled_weight_columns() -> None:
    x = torch.randn(8, 20).sign() * torch.arange(1, 21)  # the last columns dominate the scores
    w = torch.randn(3, 20).sign().requires_grad_()  # equal column norms: x alone decides
    sampled_linear(x, w, keep=0.25, method="topk").sum().backward()
    touched = (w.grad != 0).any(0)
    assert touched.sum() == 5 and bool(touched[-5:].all())


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9),
    n=st.integers(1, 40),
    p=st.integers(1, 7),
    keep=st.floats(0.01, 1.0),
    method=st.sampled_from(METHODS),
    lead=st.lists(st.integers(1, 3), max_size=2),
)
def test_random_shapes_keep_shapes_and_gradients(rows, n, p, keep, method, lead) -> None:
    x = torch.randn(*lead, rows, n, requires_grad=True)
    w = torch.randn(p, n, requires_grad=True)
    b = torch.randn(p, requires_grad=True)
    y = sampled_linear(x, w, b, keep=keep, method=method, generator=torch.Generator().manual_seed(7))
    k = min(n, max(1, round(keep * n)))  # the kept count: keep·n rounded, within [1, n]
    want = F.linear(x, w, b) if k == n else reference.linear(x, w, b, k, method, seed=7)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5 * float(want.detach().abs().max()) + 1e-6)
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and b.grad.shape == b.shape
    a, m = torch.randn(*lead, rows, n), torch.randn(n, p)
    assert sampled_matmul(a, m, keep=keep, method=method).shape == (a @ m).shape


@settings(max_examples=25, deadline=None)
@given(
    c=st.integers(1, 12),
    o=st.integers(1, 5),
    size=st.integers(3, 7),
    keep=st.floats(0.05, 1.0),
    method=st.sampled_from(METHODS),
    dims=st.sampled_from([1, 2, 3]),
    stride=st.integers(1, 2),
)
def test_random_conv_shapes(c, o, size, keep, method, dims, stride) -> None:
    x = torch.randn(2, c, *([size] * dims), requires_grad=True)
    w = torch.randn(o, c, *([3] * dims), requires_grad=True)
    y = sampled_conv(x, w, None, stride, 1, 1, keep=keep, method=method)
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    assert y.shape == conv(x, w, None, stride, 1).shape
    y.sum().backward()
    assert w.grad.shape == w.shape


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("x_grad", [True, False])
def test_fast_linear_matches_a_dense_masked_product(method: str, x_grad: bool) -> None:
    """The gather/scatter kernel of sampled_linear equals the dense product over a scaled mask."""
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 48) * torch.linspace(0.2, 2, 48)).requires_grad_(x_grad)
    w, b = torch.randn(7, 48, requires_grad=True), torch.randn(7, requires_grad=True)
    y = sampled_linear(x, w, b, keep=0.3, method=method, generator=torch.Generator().manual_seed(5))
    y.pow(2).sum().backward()
    got = (y.detach(), x.grad, w.grad.clone(), b.grad.clone())
    w.grad = b.grad = x.grad = None
    ref = reference.linear(x, w, b, 14, method, seed=5)  # keep 0.3 of 48 is k = 14
    ref.pow(2).sum().backward()
    tol = {"rtol": 1e-4, "atol": 1e-4}  # crs repeats indices: summation order differs
    torch.testing.assert_close(got[0], ref.detach(), **tol)
    assert not torch.allclose(got[0], F.linear(x, w, b).detach(), **tol)  # really sampled
    if x_grad:
        torch.testing.assert_close(got[1], x.grad, **tol)
    else:
        assert got[1] is None
    torch.testing.assert_close(got[2], w.grad, **tol)
    torch.testing.assert_close(got[3], b.grad, **tol)
    kept = int((w.grad != 0).any(0).sum())
    assert kept <= 14 if method != "bernoulli" else 0 < kept < 48


@pytest.mark.parametrize(
    ("shape", "dim", "transposed"),
    [((3, 4, 10, 9), -1, False), ((3, 4, 10, 9), 3, False), ((3, 4, 10, 9), -1, True),
     ((3, 4, 10, 9), 2, False), ((5, 9), -1, False), ((2, 10, 9), 1, False)],
)  # fmt: skip
def test_select_matches_index_select_values_and_gradients(shape: tuple, dim: int, transposed: bool) -> None:
    from approxcompile.ops.sampled import select

    t = torch.randn(*shape, dtype=torch.float64)
    if transposed:  # a non-contiguous view takes index_select's own path
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    t.requires_grad_(True)
    index = torch.tensor([0, 3, 4, 8])
    got, want = select(t, dim, index), t.index_select(dim, index)
    assert got.shape == want.shape and torch.equal(got, want)
    g = torch.randn_like(want)
    (dgot,) = torch.autograd.grad(got, t, g)
    (dwant,) = torch.autograd.grad(want, t, g)
    assert torch.equal(dgot, dwant)
