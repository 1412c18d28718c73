"""The fast kernels compute what a dense product over the kept pairs computes, and reuse memory safely."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from approxcompile.ops import sampled_conv, sampled_linear
from approxcompile.ops.kernels import column_norms, slice_norms
from approxcompile.ops.workspace import WORKSPACE, Workspace
from tests import reference

METHODS = ("topk", "crs", "bernoulli", "uniform", "wta_crs")


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float32 rounding relative to the tensor's largest entry.

    The reference's scores (sums of squares) round differently from the kernel's, which moves
    the crs/bernoulli scales by ~1e-7 relative, and the dense product sums over every channel:
    an entry where large terms cancel can differ by 1e-5 of the largest one.
    """
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("rows", [3, 300, 512, 513, 1100])
def test_column_norms_match_torch(rows: int) -> None:
    t = torch.randn(rows, 37)
    torch.testing.assert_close(column_norms(t), t.norm(dim=0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_fast_conv_matches_a_dense_masked_convolution(method: str, x_grad: bool, dims: int) -> None:
    torch.manual_seed(0)
    spatial = (7,) * dims
    x = (torch.randn(2, 40, *spatial) * torch.linspace(0.2, 2, 40).view(1, -1, *[1] * dims)).requires_grad_(
        x_grad
    )
    w = torch.randn(6, 40, *(3,) * dims, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    stride, padding, dilation = (2,) * dims, (1,) * dims, (1,) * dims
    y = sampled_conv(
        x,
        w,
        b,
        stride,
        padding,
        dilation,
        keep=0.3,
        method=method,
        generator=torch.Generator().manual_seed(5),
    )
    y.pow(2).sum().backward()
    got = (y.detach(), x.grad, w.grad.clone(), b.grad.clone())
    w.grad = b.grad = x.grad = None
    ref = reference.conv(x, w, b, 12, method, 5, stride, padding, dilation)  # keep 0.3 of 40: k = 12
    ref.pow(2).sum().backward()
    _close(got[0], ref.detach())
    assert not torch.allclose(
        got[0], conv(x, w, b, stride, padding, dilation).detach(), 1e-3, 1e-3
    )  # sampled
    if x_grad:
        _close(got[1], x.grad)
    else:
        assert got[1] is None
    _close(got[2], w.grad)
    _close(got[3], b.grad)
    assert (w.grad != 0).any(dim=(0, *range(2, 2 + dims))).sum() <= 20  # unsampled channels get 0


def _step(w: torch.Tensor, x: torch.Tensor, seed: int) -> None:
    y = sampled_linear(x, w, None, keep=0.25, method="uniform", generator=torch.Generator().manual_seed(seed))
    y.sum().backward()


def _reference_grad(w: torch.Tensor, x: torch.Tensor, seed: int) -> torch.Tensor:
    w2 = w.detach().clone().requires_grad_(True)
    reference.linear(x, w2, None, 16, "uniform", seed).sum().backward()  # keep 0.25 of 64: k = 16
    assert w2.grad is not None
    return w2.grad


@pytest.mark.usefixtures("general_linear")
def test_workspace_reuses_gradient_memory_once_it_is_free() -> None:
    w = torch.randn(8, 64, requires_grad=True)
    x = torch.randn(5, 64)
    _step(w, x, seed=1)
    first = w.grad.untyped_storage().data_ptr()
    w.grad = None  # what optimizer.zero_grad() does
    _step(w, x, seed=2)
    assert w.grad.untyped_storage().data_ptr() == first  # the freed buffer came back
    torch.testing.assert_close(w.grad, _reference_grad(w, x, seed=2))  # and was re-zeroed


@pytest.mark.usefixtures("general_linear")
def test_workspace_never_overwrites_a_gradient_someone_holds() -> None:
    w = torch.randn(8, 64, requires_grad=True)
    x = torch.randn(5, 64)
    _step(w, x, seed=1)
    kept = w.grad  # e.g. a logger holding last step's gradient
    snapshot = kept.clone()
    w.grad = None
    _step(w, x, seed=2)
    torch.testing.assert_close(kept, snapshot)
    assert w.grad.untyped_storage().data_ptr() != kept.untyped_storage().data_ptr()
    view = w.grad[0]  # a view keeps the storage alive too
    w.grad = None
    _step(w, x, seed=3)
    assert w.grad.untyped_storage().data_ptr() != view.untyped_storage().data_ptr()


def test_gradients_accumulate_across_backward_calls() -> None:
    w = torch.randn(8, 64, requires_grad=True)
    x = torch.randn(5, 64)
    _step(w, x, seed=1)
    _step(w, x, seed=2)  # zero_grad not called: the second gradient adds to the first
    want = _reference_grad(w, x, seed=1) + _reference_grad(w, x, seed=2)
    torch.testing.assert_close(w.grad, want)


def test_workspace_pools_one_storage_per_buffer_alive_at_once() -> None:
    ws = Workspace()
    cpu = torch.device("cpu")
    a = ws.get("a", (1024,), torch.float32, cpu)
    b = ws.get("a", (1024,), torch.float32, cpu)  # a is alive: a second storage
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    assert ws.nbytes() == 2 * 4096
    ptr = b.untyped_storage().data_ptr()
    del b
    c = ws.get("a", (512,), torch.float32, cpu)  # the freed one comes back, even for less
    assert c.untyped_storage().data_ptr() == ptr and c.shape == (512,)
    assert ws.nbytes() == 2 * 4096  # nothing new allocated
    ws.clear()
    assert ws.nbytes() == 0


@pytest.mark.usefixtures("general_linear")
def test_disabled_workspace_allocates_fresh() -> None:
    w = torch.randn(8, 64, requires_grad=True)
    x = torch.randn(5, 64)
    WORKSPACE.enabled = False
    try:
        _step(w, x, seed=1)
        first = w.grad.untyped_storage().data_ptr()
        held = w.grad
        w.grad = None
        _step(w, x, seed=2)
        assert w.grad.untyped_storage().data_ptr() != first
        del held
    finally:
        WORKSPACE.enabled = True


@pytest.mark.parametrize(
    ("shape", "dim"), [((2, 5, 7), 1), ((3, 6, 4, 4), 1), ((2, 4, 3, 3, 3), 1), ((2, 6, 9), -2), ((4, 9), -1)]
)
def test_slice_norms_match_one_reduction(shape: tuple[int, ...], dim: int) -> None:
    t = torch.randn(shape)
    others = tuple(d for d in range(t.dim()) if d != dim % t.dim())
    torch.testing.assert_close(slice_norms(t, dim), torch.linalg.vector_norm(t, dim=others))
    if dim == 1:  # a non-contiguous input takes the general path
        tc = t.transpose(0, 1).contiguous().transpose(0, 1)
        torch.testing.assert_close(slice_norms(tc, dim), torch.linalg.vector_norm(t, dim=others))


@pytest.mark.parametrize("frozen", ["bias", "weight", "input"])
def test_conv_gradients_go_only_where_autograd_asks(frozen: str) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 20, 5, 5, requires_grad=frozen != "input")
    w = torch.randn(3, 20, 3, 3, requires_grad=frozen != "weight")
    b = torch.randn(3, requires_grad=frozen != "bias")
    y = sampled_conv(x, w, b, 1, 1, 1, keep=0.5, method="topk")
    y.sum().backward()
    grads = {"input": x.grad, "weight": w.grad, "bias": b.grad}
    assert grads[frozen] is None
    assert all(g is not None for name, g in grads.items() if name != frozen)
    if frozen != "bias":  # d(sum y)/db = the number of output positions per channel
        torch.testing.assert_close(b.grad, torch.full((3,), 2.0 * 5 * 5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_column_norms_of_half_precision_are_computed_in_float32(dtype: torch.dtype) -> None:
    t = torch.full((600, 3), 300.0)  # 600 x 300^2 = 5.4e7: overflows float16 if squared there
    got = column_norms(t.to(dtype))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.full((3,), 300.0 * 600**0.5))


@pytest.mark.parametrize("p, n, k", [(600, 300, 90), (64, 40, 36), (33, 50, 49), (20, 8, 8), (300, 1000, 5)])
@pytest.mark.parametrize("repeats", [False, True])
@pytest.mark.parametrize("small", [False, True])
def test_weight_gradient_spread_in_place_equals_a_scatter(
    p: int, n: int, k: int, repeats: bool, small: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dW product computed in the tail of the gradient's storage and moved out in place
    (``small``: a product small enough for a buffer of its own, scattered once)."""
    import approxcompile.ops.kernels as kernels
    from approxcompile.ops.kernels import _weight_grad_in_place

    monkeypatch.setattr(kernels, "SMALL_PRODUCT", p * k if small else 0)
    g = torch.Generator().manual_seed(p + k)
    if repeats:
        index = torch.sort(torch.randint(0, n, (k,), generator=g)).values
    else:
        index = torch.sort(torch.randperm(n, generator=g)[:k]).values
    dy2, xs = torch.randn(17, p, generator=g), torch.randn(17, k, generator=g)
    want = torch.zeros(p, n).index_add_(1, index, dy2.t() @ xs)
    full = torch.full((p, n), float("nan"))  # whatever the buffer held before
    got = _weight_grad_in_place(dy2, xs, index, full, unique=not repeats)
    assert got.data_ptr() == full.data_ptr()
    torch.testing.assert_close(got, want)


@pytest.mark.usefixtures("general_linear")
def test_sampled_linear_keeps_no_weight_sized_buffer_besides_the_gradient(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a step the workspace holds the gradient and input-gradient buffers and nothing p x k
    (products above ``SMALL_PRODUCT``: this one stands for a large weight)."""
    ws = Workspace()
    x, w = torch.randn(8, 64, requires_grad=True), torch.randn(32, 64, requires_grad=True)
    import approxcompile.ops.kernels as kernels

    monkeypatch.setattr(kernels, "SMALL_PRODUCT", 0)
    saved, kernels.WORKSPACE = kernels.WORKSPACE, ws
    try:
        for _ in range(3):
            w.grad = x.grad = None
            sampled_linear(x, w, keep=0.25, method="topk").sum().backward()
        assert set(ws._slots) <= {"grad", "dx", "dws"}, ws._slots
        # "dws": the copy of the last weight-gradient rows, at most an eighth of them
        assert sum(st.nbytes() for st in ws._slots.get("dws", [])) <= (32 // 8) * 16 * 4
        assert len(ws._slots["grad"]) == 1  # the forward's column gather borrowed it, then backward used it
        assert ws.borrow("grad", (32, 16), torch.float32, torch.device("cpu")) is None  # w.grad holds it
        w.grad = None
        assert ws.borrow("grad", (32, 16), torch.float32, torch.device("cpu")) is not None
    finally:
        kernels.WORKSPACE = saved


@pytest.mark.parametrize("method", ["topk", "crs"])
def test_channels_last_conv_follows_the_input_layout_with_the_same_values(method: str) -> None:
    """A channels-last input gives channels-last y and dx, and the values and gradients of the NCHW path."""
    torch.manual_seed(0)
    x = torch.randn(2, 40, 9, 9) * torch.linspace(0.2, 2, 40).view(1, -1, 1, 1)
    w, b = torch.randn(6, 40, 3, 3), torch.randn(6)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.clone(memory_format=layout).requires_grad_(True)
        wl, bl = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        gen = torch.Generator().manual_seed(5)
        y = sampled_conv(xl, wl, bl, 1, 1, 1, keep=0.3, method=method, generator=gen)
        y.pow(2).sum().backward()
        assert xl.grad is not None and wl.grad is not None and bl.grad is not None
        for t in (y, xl.grad):
            strictly_cl = layout == torch.channels_last
            assert t.is_contiguous(memory_format=layout) and strictly_cl != t.is_contiguous()
        results.append((y.detach(), xl.grad, wl.grad, bl.grad))
    for got, want in zip(results[1], results[0], strict=True):
        _close(got, want)
    ref_x = x.clone().requires_grad_(True)
    ref_w, ref_b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    reference.conv(ref_x, ref_w, ref_b, 12, method, 5, 1, 1, 1).pow(2).sum().backward()
    _close(results[1][1], ref_x.grad)  # the channels-last gradients are autograd's too
    _close(results[1][2], ref_w.grad)


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize(("x_layout", "dy_layout"), [("cl", "nchw"), ("nchw", "cl"), ("cl", "cl")])
def test_conv_backward_of_mixed_layouts_matches_nchw(x_layout: str, dy_layout: str, traced: bool) -> None:
    """Under torch.compile ``dy`` and ``x`` may come in different layouts: same gradients.

    ``dx`` follows ``x``'s layout whatever layout the products ran in.
    """
    torch.manual_seed(0)
    fmt = {"cl": torch.channels_last, "nchw": torch.contiguous_format}
    x, w = torch.randn(2, 24, 7, 7), torch.randn(40, 24, 3, 3)
    index, scale = torch.tensor([1, 4, 5, 11, 20]), torch.rand(5) + 0.5
    conv = ([1, 1], [1, 1], [1, 1])
    ops = torch.ops.approxcompile

    def grads(xl: torch.Tensor, dyl: torch.Tensor, traced: bool) -> tuple[torch.Tensor, ...]:
        y, xs, ws = ops.sampled_conv_product(xl, w, None, index, scale, True, *conv)
        shapes = (list(x.shape), list(w.shape))
        args = (dyl, xs, ws, index, scale, *shapes, True, *conv, True, True, True)
        args = (*args, *((y, xl) if traced else ()))  # a traced backward passes y and x too (unread)
        torch.library.opcheck(ops.sampled_conv_product_backward, args)  # the fake's strides too
        return ops.sampled_conv_product_backward(*args)

    dy = torch.randn(2, 40, 7, 7)
    want = grads(x, dy, False)
    xl = x.contiguous(memory_format=fmt[x_layout])
    got = grads(xl, dy.contiguous(memory_format=fmt[dy_layout]), traced)
    assert got[0].is_contiguous(memory_format=fmt[x_layout])
    for g, e in zip(got, want, strict=True):
        _close(g, e)
