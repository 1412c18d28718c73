"""The estimator core's functions, one by one, against numbers worked out by hand.

Written for the mutants of ``approxcompile/ops/estimator.py`` that the op-level tests let
through (a CDF step dropped, ``<`` for ``<=`` on a draw equal to its keep probability, ...).
Each expectation is the arithmetic in the comment next to it, never the library's output.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from approxcompile.ops import estimator
from approxcompile.ops.sampling import sample_pairs

T = torch.tensor


def test_noise_size_is_k_for_crs_n_for_the_others_and_0_for_topk() -> None:
    assert estimator.noise_size("topk", 10, 3) == 0
    assert estimator.noise_size("crs", 10, 3) == 3  # one draw per kept pair
    assert estimator.noise_size("bernoulli", 10, 3) == 10  # one draw per pair
    assert estimator.noise_size("uniform", 10, 3) == 10


def test_probabilities_mix_the_scores_with_eps_over_n() -> None:
    # a = (1, 3, 0, 4), sum 8, eps 0.2, n 4: 0.8·a/8 + 0.05 = (0.15, 0.35, 0.05, 0.45)
    p = estimator.probabilities(T([1.0, 3.0, 0.0, 4.0]), 0.2)
    assert p.dtype == torch.float32
    assert p.tolist() == pytest.approx([0.15, 0.35, 0.05, 0.45], abs=1e-7)
    # eps = 0: the scores' proportions exactly
    assert estimator.probabilities(T([1.0, 3.0]), 0.0).tolist() == [0.25, 0.75]


def test_probabilities_read_negative_and_non_finite_scores_as_zero() -> None:
    # (2, -5, nan, inf, 2) reads as (2, 0, 0, 0, 2): eps 0 -> (0.5, 0, 0, 0, 0.5)
    p = estimator.probabilities(T([2.0, -5.0, math.nan, math.inf, 2.0]), 0.0)
    assert p.tolist() == [0.5, 0.0, 0.0, 0.0, 0.5]
    # -inf too; with eps 0.5 over n 3: 0.5·(0, 0, 1) + 1/6
    p = estimator.probabilities(T([-math.inf, 0.0, 7.0]), 0.5)
    assert p.tolist() == pytest.approx([1 / 6, 1 / 6, 4 / 6], abs=1e-7)


@pytest.mark.parametrize(
    "scores",
    [[0.0, 0.0, 0.0, 0.0], [-1.0, -2.0, 0.0, -3.0], [math.nan, 0.0, -math.inf, math.nan]],
)
def test_probabilities_without_information_are_uniform(scores: list[float]) -> None:
    p = estimator.probabilities(T(scores), 0.1)
    assert p.tolist() == [0.25] * 4


def test_probabilities_of_half_precision_scores_are_float32() -> None:
    # 0.9·(1, 1, 2)/4 + 0.1/3
    p = estimator.probabilities(T([1.0, 1.0, 2.0], dtype=torch.float16), 0.1)
    assert p.dtype == torch.float32
    assert p.tolist() == pytest.approx([0.9 / 4 + 0.1 / 3, 0.9 / 4 + 0.1 / 3, 0.9 / 2 + 0.1 / 3], abs=1e-7)


def test_inclusion_is_k_p_clamped_to_one() -> None:
    # k = 3: 3·(0.1, 0.2, 0.5, 0.2) = (0.3, 0.6, 1.5 -> 1, 0.6)
    q = estimator.inclusion(T([0.1, 0.2, 0.5, 0.2]), 3)
    assert q.tolist() == pytest.approx([0.3, 0.6, 1.0, 0.6], abs=1e-7)
    assert estimator.inclusion(T([1 / 3, 2 / 3]), 1).tolist() == pytest.approx([1 / 3, 2 / 3])


def test_topk_index_is_sorted_and_reads_nan_as_zero_and_inf_as_largest() -> None:
    assert estimator.topk_index(T([0.5, 3.0, 1.0, 2.0]), 2).tolist() == [1, 3]
    assert estimator.topk_index(T([0.5, 3.0, 1.0, 2.0]), 2, ordered=True).tolist() == [1, 3]
    # NaN counts as 0: below 0.5 and above -0.5 (and -1)
    assert estimator.topk_index(T([math.nan, 0.5, -0.5]), 2).tolist() == [0, 1]
    assert estimator.topk_index(T([math.nan, 0.5, -1.0]), 1).tolist() == [1]
    assert estimator.topk_index(T([-0.5, math.nan, -2.0]), 1).tolist() == [1]
    # +inf is the largest; -inf the smallest
    assert estimator.topk_index(T([1.0, math.inf, 2.0, -math.inf]), 1).tolist() == [1]
    assert estimator.topk_index(T([-math.inf, math.inf, 2.0, 1.0]), 3).tolist() == [1, 2, 3]
    # half-precision scores pick the same pairs
    assert estimator.topk_index(T([0.5, 3.0, 1.0, 2.0], dtype=torch.float16), 3).tolist() == [1, 2, 3]


def test_topk_index_with_both_nan_and_inf() -> None:
    # inf -> float32 max, nan -> 0: order inf, 5, nan(0), -2
    assert estimator.topk_index(T([math.nan, -2.0, math.inf, 5.0]), 3).tolist() == [0, 2, 3]


def test_uniform_index_keeps_the_k_largest_draws_sorted() -> None:
    # the three largest: 0.9 (1), 0.7 (3), 0.5 (4)
    assert estimator.uniform_index(T([0.3, 0.9, 0.1, 0.7, 0.5]), 3).tolist() == [1, 3, 4]
    assert estimator.uniform_index(T([0.3, 0.9, 0.1, 0.7, 0.5]), 1).tolist() == [1]


def test_crs_index_inverts_the_cdf_by_hand() -> None:
    # p = (0.25, 0.25, 0.5): CDF steps 0.25, 0.5 (the last, 1, is never compared)
    # u 0.1 -> 0 steps at or below -> 0; 0.25 -> 1; 0.3 -> 1; 0.5 -> 2; 0.9 -> 2; 0.49 -> 1
    p = T([0.25, 0.25, 0.5])
    got = estimator.crs_index(p, T([0.9, 0.1, 0.25, 0.3, 0.5, 0.49]))
    assert got.tolist() == [0, 1, 1, 1, 2, 2]
    assert got.dtype == torch.int64
    # four pairs: the last one is reached by a draw above the third step
    p = T([0.1, 0.2, 0.3, 0.4])  # steps 0.1, 0.3, 0.6
    assert estimator.crs_index(p, T([0.95, 0.05, 0.65, 0.59])).tolist() == [0, 2, 3, 3]


def test_crs_scale_is_one_over_k_p() -> None:
    # k = 4: 1/(4·0.5) = 0.5, 1/(4·0.125) = 2, 1/(4·0.25) = 1
    assert estimator.crs_scale(T([0.5, 0.125, 0.25]), 4).tolist() == [0.5, 2.0, 1.0]


def test_bernoulli_keeps_a_pair_only_when_its_draw_is_below_the_keep_probability() -> None:
    q = T([0.5, 0.5, 0.25, 1.0, 0.0])
    u = T([0.5, 0.4999, 0.26, 0.9999, 0.0])
    # 0.5 < 0.5 no; 0.4999 < 0.5 yes; 0.26 < 0.25 no; 0.9999 < 1 yes; 0 < 0 no
    assert estimator.bernoulli_drawn(q, u).tolist() == [False, True, False, True, False]


def test_uniform_scale_is_n_over_k_k_times() -> None:
    s = estimator.uniform_scale(10, 4, torch.zeros(3))
    assert s.tolist() == [2.5, 2.5, 2.5, 2.5]


def test_scale_along_multiplies_index_i_of_one_dim() -> None:
    t = torch.ones(2, 3)
    assert estimator.scale_along(t, None, 1) is t
    # dim 1: column j times scale[j]
    assert estimator.scale_along(t, T([1.0, 2.0, 3.0]), 1).tolist() == [[1, 2, 3], [1, 2, 3]]
    # dim 0: row i times scale[i]
    assert estimator.scale_along(t, T([2.0, -1.0]), 0).tolist() == [[2, 2, 2], [-1, -1, -1]]
    # a negative dim counts from the end
    assert estimator.scale_along(t, T([1.0, 0.0, 2.0]), -1).tolist() == [[1, 0, 2], [1, 0, 2]]
    # the scale is cast to the tensor's dtype, not the tensor to the scale's
    half = estimator.scale_along(torch.ones(2, 2, dtype=torch.float16), T([0.5, 4.0]), 1)
    assert half.dtype == torch.float16 and half.tolist() == [[0.5, 4.0], [0.5, 4.0]]
    dbl = estimator.scale_along(torch.ones(1, 2, dtype=torch.float64), T([3.0, 1.0]), 1)
    assert dbl.dtype == torch.float64


def test_conv_table_by_spatial_dims() -> None:
    assert estimator.CONV == {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def test_default_eps() -> None:
    assert estimator.DEFAULT_EPS == 0.1


def test_options_are_keyword_only() -> None:
    # a positional True could be read as the wrong option; both signatures refuse it
    with pytest.raises(TypeError):
        estimator.topk_index(T([1.0, 2.0]), 1, True)  # type: ignore[misc]
    with pytest.raises(TypeError):
        sample_pairs(T([1.0, 2.0]), 1, "crs", 0.1)  # type: ignore[misc]
