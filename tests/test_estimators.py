"""The estimators against references written by hand, for the runtime ops and the export twins.

Nothing here builds its expectation with the library's own sampler or gather path: kept
indices and scales are worked out on paper from ``p = (1-eps)·a/sum(a) + eps/n``, and the
products are dense ones over the columns that must survive.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from approxcompile.export import estimators
from approxcompile.ops import sample_pairs, sampled_addmm, sampled_conv, sampled_linear, sampled_matmul

# n = 10 scores, one dominant: p_0 = 0.9 * 1 + 0.1/10 = 0.91, p_i = 0.01 for the others.
# With k = 4: k·p_0 = 3.64 (> 1, so pair 0 is always kept, scale exactly 1) and
# k·p_i = 0.04 for the others (kept when u < 0.04, scale 1/0.04 = 25).
DOMINANT = torch.tensor([100.0] + [0.0] * 9)


def test_runtime_bernoulli_keeps_a_dominant_pair_with_scale_exactly_one() -> None:
    g = torch.Generator().manual_seed(0)
    others = 0
    for _ in range(200):
        index, scale = sample_pairs(DOMINANT, 4, "bernoulli", generator=g)
        assert scale is not None and index[0] == 0
        assert scale[0] == 1.0  # min(1, k·p_0) = 1: no shrinking of the pair that is always there
        assert torch.allclose(scale[1:], torch.full_like(scale[1:], 25.0))
        others += index.numel() - 1
    # 9 pairs at probability 0.04 each over 200 draws: 72 expected (sd 8.3)
    assert 40 <= others <= 105


def test_export_bernoulli_with_given_uniforms_keeps_what_the_hand_computation_says() -> None:
    u = torch.tensor([0.99, 0.03, 0.05, 0.5, 0.039, 0.041, 0.9, 0.0, 0.2, 0.3])
    index, scale = estimators.sample(DOMINANT, 4, "bernoulli", noise=u)
    assert index.tolist() == [0, 1, 4, 7]  # u < 1 for pair 0, u < 0.04 for the rest
    assert scale is not None
    torch.testing.assert_close(scale, torch.tensor([1.0, 25.0, 25.0, 25.0]))
    assert scale[0] == 1.0


def test_export_crs_inverse_cdf_draws_by_hand() -> None:
    # scores (1, 3, 0, 0) with eps = 0: p = (0.25, 0.75, 0, 0), cdf = (0.25, 1, 1, 1)
    scores = torch.tensor([1.0, 3.0, 0.0, 0.0])
    index, scale = estimators.sample(scores, 2, "crs", eps=0.0, noise=torch.tensor([0.9, 0.1]))
    assert index.tolist() == [0, 1]
    assert scale is not None
    torch.testing.assert_close(scale, torch.tensor([1 / (2 * 0.25), 1 / (2 * 0.75)]))


def test_runtime_crs_scale_is_one_over_k_p_by_hand() -> None:
    scores = torch.tensor([1.0, 3.0, 0.0, 0.0])
    index, scale = sample_pairs(scores, 3, "crs", eps=0.0, generator=torch.Generator().manual_seed(0))
    assert set(index.tolist()) <= {0, 1}  # p = 0 for the zero scores when eps = 0
    assert index.tolist() == sorted(index.tolist())
    want = {0: 1 / (3 * 0.25), 1: 1 / (3 * 0.75)}
    torch.testing.assert_close(scale, torch.tensor([want[i] for i in index.tolist()]))


def test_uniform_and_topk_by_hand() -> None:
    scores = torch.tensor([0.5, 4.0, 1.0, 3.0, 2.0])
    index, scale = sample_pairs(scores, 2, "topk")
    assert index.tolist() == [1, 3] and scale is None
    index, scale = estimators.sample(scores, 2, "topk")
    assert index.tolist() == [1, 3] and scale is None
    index, scale = estimators.sample(scores, 2, "uniform", noise=torch.tensor([0.1, 0.7, 0.2, 0.9, 0.3]))
    assert index.tolist() == [1, 3]  # the two largest uniforms
    torch.testing.assert_close(scale, torch.tensor([2.5, 2.5]))
    index, scale = sample_pairs(scores, 2, "uniform", generator=torch.Generator().manual_seed(0))
    assert index.numel() == 2 and index[0] < index[1]
    torch.testing.assert_close(scale, torch.tensor([2.5, 2.5]))


def test_all_zero_scores_fall_back_to_uniform_probabilities() -> None:
    # p = 1/n = 0.25 each; k = 2: bernoulli keeps with 0.5, scale 2
    u = torch.tensor([0.4, 0.6, 0.1, 0.9])
    index, scale = estimators.sample(torch.zeros(4), 2, "bernoulli", noise=u)
    assert index.tolist() == [0, 2]
    torch.testing.assert_close(scale, torch.tensor([2.0, 2.0]))
    g = torch.Generator().manual_seed(0)
    index, scale = sample_pairs(torch.zeros(4), 2, "bernoulli", generator=g)
    assert scale is not None and bool((scale == 2.0).all())


def test_nothing_drawn_keeps_one_pair_scaled_by_zero() -> None:
    u = torch.ones(4)  # u < keep_p fails everywhere
    index, scale = estimators.sample(torch.tensor([1.0, 2.0, 1.0, 1.0]), 1, "bernoulli", noise=u)
    assert index.tolist() == [1] and scale is not None and scale.tolist() == [0.0]


# -- one dominant column, every other column zero: the estimate must be the exact product ------


def _dominant_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.zeros(6, 32)
    x[:, 0] = torch.randn(6, generator=g)
    a = torch.zeros(2, 5, 24)
    a[..., 0] = torch.randn(2, 5, generator=g)
    img = torch.zeros(2, 12, 5, 5)
    img[:, 0] = torch.randn(2, 5, 5, generator=g)
    return {
        "x": x,
        "w": torch.randn(7, 32, generator=g),
        "a": a,
        "b": torch.randn(2, 24, 4, generator=g),
        "bias": torch.randn(4, generator=g),
        "img": img,
        "kern": torch.randn(3, 12, 3, 3, generator=g),
    }


def _dominant_cases() -> dict[str, tuple]:
    t = _dominant_inputs()
    x, w, a, b, bias, img, kern = (t[k] for k in ("x", "w", "a", "b", "bias", "img", "kern"))
    # References: only column / channel 0 carries anything, so the product is its outer product.
    return {
        "linear": (
            lambda mod, **kw: (sampled_linear if mod == "ops" else estimators.export_linear)(
                x, w, None, **kw
            ),
            x[:, 0:1] * w[:, 0].unsqueeze(0),
        ),
        "linear_transposed": (
            lambda mod, **kw: (
                estimators.export_linear(x, w.t().contiguous(), None, transposed=True, **kw)
                if mod == "export"
                else sampled_linear(x, w, None, **kw)
            ),
            x[:, 0:1] * w[:, 0].unsqueeze(0),
        ),
        "matmul": (
            lambda mod, **kw: (sampled_matmul if mod == "ops" else estimators.export_matmul)(a, b, **kw),
            a[..., 0:1] * b[:, 0:1, :],
        ),
        "addmm": (
            lambda mod, **kw: (sampled_addmm if mod == "ops" else estimators.export_addmm)(
                bias, a[0], b[0], **kw
            ),
            bias + a[0, :, 0:1] * b[0, 0:1, :],
        ),
        "conv": (
            lambda mod, **kw: (sampled_conv if mod == "ops" else estimators.export_conv)(
                img, kern, None, 1, 1, 1, **kw
            ),
            F.conv2d(img[:, :1], kern[:, :1], None, 1, 1),
        ),
    }


DOMINANT_CASES = _dominant_cases()


@pytest.mark.parametrize("mod", ["ops", "export"])
@pytest.mark.parametrize("op", DOMINANT_CASES)
def test_bernoulli_keeps_a_dominant_column_unscaled(op: str, mod: str) -> None:
    """k·p_0 > 1 for the one column with a nonzero score: kept every draw, scale 1, estimate exact."""
    fn, want = DOMINANT_CASES[op]
    torch.manual_seed(0)
    for _ in range(5):
        got = fn(mod, keep=0.25, method="bernoulli")
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


INNER = {"linear": 32, "linear_transposed": 32, "matmul": 24, "addmm": 24, "conv": 12}


@pytest.mark.parametrize("mod", ["ops", "export"])
@pytest.mark.parametrize("op", DOMINANT_CASES)
@pytest.mark.parametrize("method", ["crs", "uniform", "topk"])
def test_other_methods_on_a_dominant_column(op: str, mod: str, method: str) -> None:
    """topk keeps column 0: exact. The random methods give a multiple of the exact product.

    crs draws column 0 some c of k times at scale 1/(k·p_0) each (p_0 = 0.9 + 0.1/n), so the
    estimate is c/(k·p_0) times exact; uniform keeps it (scale n/k) or not (zero).
    """
    fn, want = DOMINANT_CASES[op]
    torch.manual_seed(0)
    got = fn(mod, keep=0.25, method=method)
    if method == "topk":
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return
    offset = _dominant_inputs()["bias"] if op == "addmm" else torch.zeros(())
    n = INNER[op]
    k = round(0.25 * n)
    unit = 1 / (k * (0.9 + 0.1 / n)) if method == "crs" else n / k
    ratio = float((got - offset).flatten()[0] / (want - offset).flatten()[0])
    count = round(ratio / unit)
    assert 0 <= count <= (k if method == "crs" else 1)
    torch.testing.assert_close(got - offset, (want - offset) * count * unit, rtol=1e-5, atol=1e-5)


# -- unbiasedness with k·p > 1 ----------------------------------------------------------------


def _skewed() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(16, 32, generator=g)
    x[:, 0] *= 60.0  # column 0 holds most of the score mass: k·p_0 is about 6 at k = 8
    w = torch.randn(8, 32, generator=g)
    img = torch.randn(2, 12, 5, 5, generator=g)
    img[:, 0] *= 40.0
    kern = torch.randn(4, 12, 3, 3, generator=g)
    return x, w, img, kern


SKEWED = {
    "ops_linear": lambda x, w, img, kern, g: sampled_linear(x, w, keep=0.25, method="bernoulli", generator=g),
    "export_linear": lambda x, w, img, kern, g: estimators.export_linear(
        x, w, keep=0.25, method="bernoulli", noise=torch.rand(32, generator=g)
    ),
    "ops_conv": lambda x, w, img, kern, g: sampled_conv(
        img, kern, None, 1, 1, 1, keep=0.25, method="bernoulli", generator=g
    ),
    "export_conv": lambda x, w, img, kern, g: estimators.export_conv(
        img, kern, None, 1, 1, 1, keep=0.25, method="bernoulli", noise=torch.rand(12, generator=g)
    ),
}


@pytest.mark.parametrize("case", SKEWED)
def test_bernoulli_is_unbiased_when_a_keep_probability_saturates(case: str) -> None:
    """|mean - exact|^2 < 3·sum(var)/N over 2,000 seeded draws, on an input where k·p_0 > 1."""
    x, w, img, kern = _skewed()
    if "linear" in case:
        scores = x.pow(2).sum(0).sqrt() * w.pow(2).sum(0).sqrt()
    else:
        scores = img.pow(2).sum((0, 2, 3)).sqrt() * kern.pow(2).sum((0, 2, 3)).sqrt()
    p0 = 0.9 * scores[0] / scores.sum() + 0.1 / scores.numel()
    assert 0.25 * scores.numel() * p0 > 2  # the clamp is really reached
    exact = F.linear(x, w) if "linear" in case else F.conv2d(img, kern, None, 1, 1)
    g = torch.Generator().manual_seed(5)
    draws = 2000
    samples = torch.stack([SKEWED[case](x, w, img, kern, g) for _ in range(draws)])
    sq_err = float((samples.mean(0) - exact).pow(2).sum())
    floor = float(samples.var(0).sum()) / draws
    assert sq_err < 3.0 * floor, (sq_err, floor)
    # and the estimate is not trivially exact: the other columns really are sampled
    assert floor > 0


def test_a_nan_score_counts_as_zero() -> None:
    # eps = 0: p = (0, 1, 0, 0), so crs draws pair 1 every time, scale 1/(3·1)
    scores = torch.tensor([float("nan"), 1.0, 0.0, 0.0])
    index, scale = sample_pairs(scores, 3, "crs", eps=0.0, generator=torch.Generator().manual_seed(0))
    assert index.tolist() == [1, 1, 1]
    torch.testing.assert_close(scale, torch.full((3,), 1 / 3))
    index, scale = estimators.sample(scores, 3, "crs", eps=0.0, noise=torch.tensor([0.0, 0.5, 0.99]))
    assert index.tolist() == [1, 1, 1]
    # infinities too: +inf and -inf score 0, never a division by an infinite total
    scores = torch.tensor([float("inf"), 1.0, float("-inf"), 0.0])
    index, _ = sample_pairs(scores, 20, "crs", eps=0.0, generator=torch.Generator().manual_seed(0))
    assert index.tolist() == [1] * 20
    # and so do negative scores (norms never are, but a caller's scores might be)
    index, _ = sample_pairs(torch.tensor([-1.0, 1.0, 0.0, 0.0]), 20, "crs", eps=0.0)
    assert index.tolist() == [1] * 20


@pytest.mark.parametrize("method", ["zzz", "variance", "Topk", ""])
def test_unknown_methods_are_refused_by_both_samplers(method: str) -> None:
    with pytest.raises(ValueError, match=f"unknown sampling method '{method}'"):
        sample_pairs(torch.ones(4), 2, method)
    with pytest.raises(ValueError, match=f"unknown sampling method '{method}'"):
        estimators.sample(torch.ones(4), 2, method)


def test_topk_ranks_a_nan_score_as_zero() -> None:
    scores = torch.tensor([float("nan"), 0.5, 0.2, 0.1])
    for sampler in (sample_pairs, estimators.sample):
        index, scale = sampler(scores, 2, "topk")
        assert index.tolist() == [1, 2] and scale is None
    # +inf is the largest score there is
    index, _ = sample_pairs(torch.tensor([0.5, float("inf"), 0.2]), 1, "topk")
    assert index.tolist() == [1]


def test_small_scores_are_proportional_too() -> None:
    # (0.01, 0.03, 0, 0) sums to 0.04: still p = (0.25, 0.75, 0, 0) with eps = 0
    scores = torch.tensor([0.01, 0.03, 0.0, 0.0])
    index, scale = sample_pairs(scores, 4, "crs", eps=0.0, generator=torch.Generator().manual_seed(1))
    assert set(index.tolist()) <= {0, 1}
    want = {0: 1 / (4 * 0.25), 1: 1 / (4 * 0.75)}
    torch.testing.assert_close(scale, torch.tensor([want[i] for i in index.tolist()]))


def test_runtime_bernoulli_with_nothing_drawn_keeps_one_pair_scaled_by_zero() -> None:
    # 1000 pairs at k·p = 0.001 each: nothing is drawn with probability 0.999^1000 = 0.37
    scores = torch.ones(1000)
    g = torch.Generator().manual_seed(0)
    outcomes = [sample_pairs(scores, 1, "bernoulli", generator=g) for _ in range(20)]
    empty = [(i, s) for i, s in outcomes if s is not None and bool((s == 0).all())]
    assert empty, "20 draws at 0.37 each: some draw keeps nothing"
    for index, scale in empty:
        assert index.shape == (1,) and scale.tolist() == [0.0]
    for index, scale in outcomes:
        assert scale is not None and index.shape == scale.shape and index.numel() >= 1


def test_bernoulli_scale_is_one_over_the_keep_probability() -> None:
    # k = 3: k·p_i = 0.03 for the nine small pairs, scale 1/0.03 = 33.33 (not an integer)
    g = torch.Generator().manual_seed(0)
    seen = 0
    for _ in range(100):
        index, scale = sample_pairs(DOMINANT, 3, "bernoulli", generator=g)
        assert scale is not None and index[0] == 0 and scale[0] == 1.0
        torch.testing.assert_close(scale[1:], torch.full_like(scale[1:], 1 / 0.03))
        seen += index.numel() - 1
    assert seen > 0
    u = torch.tensor([0.5, 0.02, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    index, scale = estimators.sample(DOMINANT, 3, "bernoulli", noise=u)
    assert index.tolist() == [0, 1]
    torch.testing.assert_close(scale, torch.tensor([1.0, 1 / 0.03]))
