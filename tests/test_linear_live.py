"""A sampled linear's backward leaves out the output columns whose gradient is all zero, exactly.

Behind a forward-sampled linear and an elementwise activation only the input columns that
linear kept receive a gradient; the previous sampled linear's backward then runs its products
over those columns alone. These tests check that the shortcut is taken, and that its gradients
are those of the backward over every column (to fp32 rounding: the products sum over fewer
terms, all the left-out ones exact zeros), for every gradient mask, with repeated indices,
NaN and all-zero or dense gradients.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from approxcompile.ops import kernels, sampled_linear
from approxcompile.ops.live import HEAD_ROWS, live_columns
from tests import reference


@pytest.fixture(autouse=True, params=["small", "large"])
def _test_every_product(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, general_linear: None
) -> None:
    """These small products are below the size where the op looks for live columns at all;
    "large": their weight gradients take the path of products above ``SMALL_PRODUCT``.
    ``general_linear``: the general kernel, where the live columns are."""
    monkeypatch.setattr(kernels, "LIVE_MIN_PRODUCT", 0)
    monkeypatch.setattr(kernels, "LIVE_MIN_MACS", 0)
    if request.param == "large":
        monkeypatch.setattr(kernels, "SMALL_PRODUCT", 0)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(
        got, want, rtol=1e-5, atol=1e-6 * float(want.nan_to_num().abs().max()), equal_nan=True
    )


@contextmanager
def _spy_live(dense: bool = False) -> Iterator[list[torch.Tensor | None]]:
    """What every call of ``live_columns`` returned, in order; ``dense``: make it return ``None``."""
    seen: list[torch.Tensor | None] = []
    real = kernels.live_columns

    def spy(dy: torch.Tensor) -> torch.Tensor | None:
        seen.append(None if dense else real(dy))
        return seen[-1]

    kernels.live_columns = spy
    try:
        yield seen
    finally:
        kernels.live_columns = real


def _two_layers(sampled: bool) -> tuple[torch.Tensor, ...]:
    """linear(40->24) -> ReLU -> linear(24->6), both sampled (or both dense references)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 7, 40, generator=g) * torch.linspace(0.2, 2, 40)).requires_grad_(True)
    w1 = torch.randn(24, 40, generator=g).requires_grad_(True)
    b1 = torch.randn(24, generator=g).requires_grad_(True)
    w2 = torch.randn(6, 24, generator=g).requires_grad_(True)
    if sampled:
        h = sampled_linear(x, w1, b1, keep=0.4, generator=torch.Generator().manual_seed(3))
        y = sampled_linear(F.relu(h), w2, None, keep=0.25, generator=torch.Generator().manual_seed(4))
    else:
        h = reference.linear(x, w1, b1, 16, "topk", 3)  # keep 0.4 of 40
        y = reference.linear(F.relu(h), w2, None, 6, "topk", 4)  # keep 0.25 of 24
    y.pow(2).sum().backward()
    assert x.grad is not None and w1.grad is not None and b1.grad is not None and w2.grad is not None
    return y.detach(), x.grad, w1.grad, b1.grad, w2.grad


def test_backward_over_live_columns_matches_the_dense_reference() -> None:
    with _spy_live() as seen:
        got = _two_layers(sampled=True)
    # backward runs the second linear first: its dy is dense; the first one's dy is live
    # only on the (at most) 6 of 24 columns the second linear kept
    assert len(seen) == 2 and seen[0] is None
    live = seen[1]
    assert live is not None and 0 < live.numel() <= 6
    want = _two_layers(sampled=False)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * float(w.abs().max()))
    dead = torch.ones(24, dtype=torch.bool)
    dead[live] = False
    assert (got[2][dead] == 0).all() and (got[3][dead] == 0).all()  # dW rows and db of dead columns


def test_live_columns_are_exact() -> None:
    """Tiny values (whose squares underflow), negative-only columns and NaN all count as live."""
    dy = torch.zeros(100, 8)
    dy[70, 1] = 1e-30  # past the first HEAD_ROWS rows
    dy[:, 4] = -torch.rand(100) - 0.1
    dy[3, 6] = float("nan")
    live = live_columns(dy)
    assert live is not None and live.tolist() == [1, 4, 6]
    assert live_columns(dy.t().contiguous().t()).tolist() == [1, 4, 6]  # type: ignore[union-attr]
    assert live_columns(torch.randn(100, 8)) is None  # dense: no slicing
    relu = F.relu(torch.randn(100, 8))  # half the entries zero, every column live
    assert live_columns(relu) is None
    late = torch.zeros(100, 8)
    late[HEAD_ROWS:] = 1.0  # every column live, none in the first rows
    assert live_columns(late) is None
    dy[:, :7] = 1.0  # 7 of 8 live: above LIVE_MAX, not worth slicing
    assert live_columns(dy) is None
    assert live_columns(torch.zeros(100, 8)).numel() == 0  # type: ignore[union-attr]
    assert live_columns(torch.zeros(3, 8, 2)) is None  # not 2-D


def _backward_args(dy: torch.Tensor, unique: bool) -> tuple[object, ...]:
    g = torch.Generator().manual_seed(2)
    m, p, n = dy.shape[0], dy.shape[1], 12
    index = torch.tensor([0, 2, 3, 7, 9]) if unique else torch.tensor([0, 2, 2, 7, 9])
    xs = torch.randn(m, index.numel(), generator=g)
    weight = torch.randn(p, n, generator=g)
    scale = torch.tensor([1.5, 2.0, 1.0, 3.0, 2.5])
    return dy, xs, weight, index, scale, [m // 3, 3, n], n, unique


def _both(args: tuple[object, ...], need_x: bool, need_w: bool) -> tuple[list[torch.Tensor], ...]:
    """The backward as it runs, and over every output column, with what ``live_columns`` said."""
    op = kernels.sampled_linear_product_backward
    with _spy_live() as seen:
        got = [t.clone() for t in op(*args, need_x, need_w)]  # type: ignore[arg-type]
    with _spy_live(dense=True):
        want = [t.clone() for t in op(*args, need_x, need_w)]  # type: ignore[arg-type]
    return got, want, seen  # type: ignore[return-value]


@pytest.mark.parametrize(("need_x", "need_w"), [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("unique", [True, False])
def test_live_backward_equals_the_full_backward_for_every_gradient_mask(
    need_x: bool, need_w: bool, unique: bool
) -> None:
    dy = torch.zeros(60, 16)
    dy[:, [1, 5, 6, 11]] = torch.randn(60, 4, generator=torch.Generator().manual_seed(5))
    got, want, seen = _both(_backward_args(dy, unique), need_x, need_w)
    assert seen[0] is not None and seen[0].tolist() == [1, 5, 6, 11]
    for a, b, needed in zip(got, want, (need_x, need_w), strict=True):
        assert a.shape == b.shape and (a.numel() > 0) == needed
        if needed:
            _close(a, b)
    if need_w:
        dead = torch.ones(16, dtype=torch.bool)
        dead[[1, 5, 6, 11]] = False
        assert (got[1][dead] == 0).all() and got[1][~dead].abs().sum() > 0


def test_live_weight_gradient_widens_a_lower_precision_product() -> None:
    """Under autocast ``dy`` and ``xs`` are bfloat16, the weight and its gradient float32."""
    dy = torch.zeros(60, 16, dtype=torch.bfloat16)
    dy[:, [0, 7, 15]] = torch.randn(60, 3, generator=torch.Generator().manual_seed(6)).bfloat16()
    dy_, xs, *rest = _backward_args(dy, unique=False)
    assert isinstance(xs, torch.Tensor)
    args = (dy_, xs.bfloat16(), *rest)
    got, want, seen = _both(args, False, True)
    assert seen[0] is not None and seen[0].tolist() == [0, 7, 15]
    assert got[1].dtype == torch.float32
    _close(got[1], want[1])


@pytest.mark.parametrize("case", ["dense", "zero", "nan"])
def test_dense_zero_and_nan_gradients(case: str) -> None:
    dy = torch.zeros(60, 16)
    if case == "dense":
        dy = torch.randn(60, 16)
    elif case == "nan":  # a column zero except for one NaN looks dead but must stay live
        dy[:, 3] = torch.randn(60)
        dy[40, 9] = float("nan")
    got, want, seen = _both(_backward_args(dy, unique=True), True, True)
    expect = {"dense": None, "zero": [], "nan": [3, 9]}[case]
    assert (None if seen[0] is None else seen[0].tolist()) == expect
    for a, b in zip(got, want, strict=True):
        _close(a, b)
    if case == "zero":
        assert (got[0] == 0).all() and (got[1] == 0).all()
    if case == "nan":
        assert got[0][13].isnan().any() and got[1][9].isnan().any() and not got[1][3].isnan().any()


def test_bias_only_training_gets_the_exact_bias_gradient() -> None:
    """Frozen input and weight, trainable bias (as in bias-only fine-tuning)."""
    x, w = torch.randn(4, 3, 20), torch.randn(5, 20)
    b = torch.randn(5, requires_grad=True)
    sampled_linear(x, w, b, keep=0.5).sum().backward()
    torch.testing.assert_close(b.grad, torch.full((5,), 12.0))


def test_thin_products_skip_the_live_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below LIVE_MIN_PRODUCT (kept columns times products) dy is not read for live columns."""
    monkeypatch.setattr(kernels, "LIVE_MIN_PRODUCT", 11)  # 5 kept columns: 10 with dx and dW, 5 alone
    dy = torch.zeros(60, 16)
    dy[:, 3] = 1.0
    for need_x, need_w, tested in ((True, True, False), (True, False, False)):
        with _spy_live() as seen:
            kernels.sampled_linear_product_backward(*_backward_args(dy, True), need_x, need_w)  # type: ignore[arg-type]
        assert bool(seen) == tested
    monkeypatch.setattr(kernels, "LIVE_MIN_PRODUCT", 10)
    with _spy_live() as seen:
        kernels.sampled_linear_product_backward(*_backward_args(dy, True), True, True)  # type: ignore[arg-type]
    assert seen[0] is not None and seen[0].tolist() == [3]


def test_small_products_skip_the_live_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below LIVE_MIN_MACS (rows x outputs x kept columns x products) dy is not tested either."""
    dy = torch.zeros(60, 16)
    dy[:, 3] = 1.0
    macs = 60 * 16 * 5 * 2  # 60 rows, 16 outputs, 5 kept columns, dx and dW
    for limit, tested in ((macs + 1, False), (macs, True)):
        monkeypatch.setattr(kernels, "LIVE_MIN_MACS", limit)
        with _spy_live() as seen:
            kernels.sampled_linear_product_backward(*_backward_args(dy, True), True, True)  # type: ignore[arg-type]
        assert bool(seen) == tested
