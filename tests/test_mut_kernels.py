"""The custom ops' fake (meta) implementations give the shapes the real kernels return.

Written for the mutants of ``approxcompile/ops/kernels.py`` in the ``register_fake``
functions, which only ``torch.compile`` / FakeTensor tracing reaches: ``torch.library.opcheck``
runs each op for real and on fake tensors and compares the outputs' shapes, strides and dtypes.
"""

from __future__ import annotations

import pytest
import torch

import approxcompile.ops.kernels  # noqa: F401  (registers the approxcompile:: ops)

OPS = torch.ops.approxcompile
FAKE = ("test_faketensor",)


def _g() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_product_fake_matches_the_kernel(bias: bool) -> None:
    g = _g()
    x, w = torch.randn(2, 5, 12, generator=g), torch.randn(6, 12, generator=g)
    b = torch.randn(6, generator=g) if bias else None
    index, scale = torch.tensor([1, 4, 7]), torch.tensor([2.0, 1.5, 3.0])
    torch.library.opcheck(OPS.sampled_linear_product, (x, w, b, index, scale, True), test_utils=FAKE)
    y, xs = OPS.sampled_linear_product(x, w, b, index, None, True)
    assert (y.shape, xs.shape) == ((2, 5, 6), (10, 3))


@pytest.mark.parametrize(("need_x", "need_w"), [(True, True), (True, False), (False, True)])
def test_linear_backward_fake_matches_the_kernel(need_x: bool, need_w: bool) -> None:
    g = _g()
    dy, xs, weight = (
        torch.randn(2, 5, 6, generator=g),
        torch.randn(10, 3, generator=g),
        torch.randn(6, 12, generator=g),
    )
    index, scale = torch.tensor([1, 4, 7]), torch.tensor([2.0, 1.5, 3.0])
    args = (dy, xs, weight, index, scale, [2, 5, 12], 12, True, need_x, need_w)
    torch.library.opcheck(OPS.sampled_linear_product_backward, args, test_utils=FAKE)
    dx, dw = OPS.sampled_linear_product_backward(*args)
    assert dx.shape == ((2, 5, 12) if need_x else (0,)) and dw.shape == ((6, 12) if need_w else (0,))


@pytest.mark.parametrize("bias", [True, False])
def test_conv_product_fake_matches_the_kernel(bias: bool) -> None:
    g = _g()
    x, w = torch.randn(2, 8, 7, 7, generator=g), torch.randn(4, 8, 3, 3, generator=g)
    b = torch.randn(4, generator=g) if bias else None
    index, scale = torch.tensor([0, 3, 5]), torch.tensor([2.0, 1.5, 3.0])
    args = (x, w, b, index, scale, True, [2, 2], [1, 1], [1, 1])
    torch.library.opcheck(OPS.sampled_conv_product, args, test_utils=FAKE)
    y, xs, ws = OPS.sampled_conv_product(*args)
    assert (y.shape, xs.shape, ws.shape) == ((2, 4, 4, 4), (2, 3, 7, 7), (4, 3, 3, 3))


@pytest.mark.parametrize(
    ("need_x", "need_w", "need_b"), [(True, True, True), (True, False, False), (False, True, False)]
)
def test_conv_backward_fake_matches_the_kernel(need_x: bool, need_w: bool, need_b: bool) -> None:
    g = _g()
    dy, xs, ws = (
        torch.randn(2, 4, 4, 4, generator=g),
        torch.randn(2, 3, 7, 7, generator=g),
        torch.randn(4, 3, 3, 3),
    )
    index, scale = torch.tensor([0, 3, 5]), torch.tensor([2.0, 1.5, 3.0])
    args = (
        dy,
        xs,
        ws,
        index,
        scale,
        [2, 8, 7, 7],
        [4, 8, 3, 3],
        True,
        [2, 2],
        [1, 1],
        [1, 1],
        need_x,
        need_w,
        need_b,
    )
    torch.library.opcheck(OPS.sampled_conv_product_backward, args, test_utils=FAKE)
    dx, dw, db = OPS.sampled_conv_product_backward(*args)
    assert dx.shape == ((2, 8, 7, 7) if need_x else (0,))
    assert dw.shape == ((4, 8, 3, 3) if need_w else (0,))
    assert db.shape == ((4,) if need_b else (0,))


def test_autocast_inputs_cast_only_under_autocast() -> None:
    from approxcompile.ops.kernels import autocast_inputs

    x, w, b = torch.randn(2, 4), torch.randn(3, 4), torch.randn(3)
    assert all(a is c for a, c in zip(autocast_inputs(x, w, b), (x, w, b), strict=True))  # untouched
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cx, cw, cb = autocast_inputs(x, w, b)
        assert cb is not None
        assert (cx.dtype, cw.dtype, cb.dtype) == (torch.bfloat16,) * 3
        _, _, none = autocast_inputs(x, w, None)
        assert none is None


def test_conv_fakes_follow_a_channels_last_input() -> None:
    """The fakes give the kernels' strides for a channels-last input (Inductor passes its own layout)."""
    g = _g()
    cl = torch.channels_last
    x = torch.randn(2, 8, 7, 7, generator=g).contiguous(memory_format=cl)
    w, b = torch.randn(4, 8, 3, 3, generator=g), torch.randn(4, generator=g)
    index, scale = torch.tensor([0, 3, 5]), torch.tensor([2.0, 1.5, 3.0])
    args = (x, w, b, index, scale, True, [1, 1], [1, 1], [1, 1])
    torch.library.opcheck(OPS.sampled_conv_product, args, test_utils=FAKE)
    y, xs, ws = OPS.sampled_conv_product(*args)
    assert y.is_contiguous(memory_format=cl) and not y.is_contiguous()
    assert xs.is_contiguous(memory_format=cl) and not xs.is_contiguous()
    dy = torch.randn(y.shape, generator=g).contiguous(memory_format=cl)
    shapes = ([2, 8, 7, 7], [4, 8, 3, 3])
    back = (dy, xs, ws, index, scale, *shapes, True, [1, 1], [1, 1], [1, 1], True, True, True)
    torch.library.opcheck(OPS.sampled_conv_product_backward, back, test_utils=FAKE)
    dx, _, _ = OPS.sampled_conv_product_backward(*back)
    assert dx.is_contiguous(memory_format=cl) and not dx.is_contiguous()
