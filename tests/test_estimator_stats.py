"""Every method's bias and variance on fixed inputs, as tools/estimator_stats.py measures them.

The draws come from seeded generators on one thread, so the figures are the same on every run
(docs/estimators.md shows them); the assertions say what each estimator promises: the
unbiased methods' mean error is within a few standard errors of 0, top-k's is not, and
WTA-CRS's spread is below CRS's where a few pairs carry most of the product.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from estimator_stats import Stats, measure

from approxcompile.choices import UNBIASED_METHODS
from approxcompile.ops import estimator
from approxcompile.ops.sampling import sample_pairs


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_CACHE: dict[tuple[str, str, int], Stats] = {}


def _stats(name: str, method: str, draws: int = 500) -> Stats:
    key = (name, method, draws)
    if key not in _CACHE:
        _CACHE[key] = measure(name, method, keep=0.1, draws=draws)
    return _CACHE[key]


@pytest.mark.parametrize("name", ["dot", "skewed"])
@pytest.mark.parametrize("method", UNBIASED_METHODS)
def test_unbiased_methods_mean_error_is_within_a_few_standard_errors(name: str, method: str) -> None:
    s = _stats(name, method)
    assert s.std > 0, f"{method} on {name}: no spread over {s.draws} draws, so nothing was sampled"
    assert s.z < 4, f"{method} on {name}: mean relative error {s.mean:+.4f} is {s.z:.1f} SE from 0"


@pytest.mark.parametrize("name", ["dot", "skewed"])
def test_topk_is_deterministic_and_biased(name: str) -> None:
    s = _stats(name, "topk", draws=3)
    assert s.std < 1e-9 * abs(s.mean) and abs(s.mean) > 0.01, s


@pytest.mark.parametrize("name", ["dot", "skewed"])
def test_wta_crs_spreads_less_than_crs_on_skewed_products(name: str) -> None:
    wta, crs = _stats(name, "wta_crs"), _stats(name, "crs")
    assert wta.std < 0.5 * crs.std and wta.rms < crs.rms, (wta, crs)
    assert wta.pairs > crs.pairs  # the deterministic part never repeats a pair


def _brute_force_split(scores: torch.Tensor, p: torch.Tensor, k: int) -> int:
    """argmin over c of P_R·sum_R(s²/p)/(k-c), summing over the complement of the c most likely pairs."""
    shares = (scores / scores.sum()).double()
    order = torch.argsort(p, descending=True, stable=True)
    best, best_c = float("inf"), -1
    for c in range(k):
        rest = order[c:]
        bound = float(p.double()[rest].sum() * (shares[rest] ** 2 / p.double()[rest]).sum()) / (k - c)
        if bound < best:
            best, best_c = bound, c
    return best_c


@pytest.mark.parametrize("seed", range(4))
def test_wta_split_minimises_the_bound_and_keeps_the_top_pairs_exactly(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(300, generator=g) ** (4 + 4 * seed)  # from mildly to very skewed
    k = 30
    p = estimator.probabilities(scores, estimator.DEFAULT_EPS)
    top, c, rest_p = estimator.wta_plan(scores, p, k)
    assert int(c) == _brute_force_split(scores, p, k)
    assert (rest_p[top[: int(c)]] == 0).all() and int((rest_p == 0).sum()) == int(c)
    index, scale = sample_pairs(scores, k, "wta_crs", generator=g)
    assert index.numel() == k and torch.equal(index, torch.sort(index).values)
    for pair in top[: int(c)].tolist():
        assert (index == pair).sum() == 1 and scale[index == pair].item() == 1.0
    drawn = ~torch.isin(index, top[: int(c)])
    want = rest_p.sum() / ((k - int(c)) * p[index[drawn]])
    torch.testing.assert_close(scale[drawn], want)
    if seed == 3:
        assert int(c) > 0  # very skewed scores: some pairs are worth keeping exactly


def test_wta_crs_with_flat_scores_is_crs() -> None:
    """Equal scores: no pair covers more mass than a draw, so the deterministic set is empty."""
    p = estimator.probabilities(torch.ones(100), estimator.DEFAULT_EPS)
    _, c, rest_p = estimator.wta_plan(torch.ones(100), p, 10)
    assert int(c) == 0 and torch.equal(rest_p, p)


def test_wta_draw_never_lands_on_a_kept_pair() -> None:
    """u at the top of [0, 1) with the last pairs zeroed: the draw stops at the last nonzero pair."""
    rest_p = torch.tensor([0.3, 0.0, 0.5, 0.2, 0.0, 0.0])
    u = torch.tensor([0.0, 0.29, 0.31, 0.79, 0.81, 1.0 - 2**-24])
    assert estimator.wta_draw(rest_p, u).tolist() == [0, 0, 2, 2, 3, 3]
