"""A sampled conv's backward leaves out the output channels whose gradient is all zero, exactly.

Behind a sampled convolution (and channel-wise ops: ReLU, pooling) only the channels that
convolution kept receive a gradient; the previous sampled conv's backward then runs its
products over those channels alone. These tests check that the shortcut is taken, and that
values and gradients are those of the dense reference in NCHW and channels-last layouts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from approxcompile.ops import kernels, sampled_conv
from approxcompile.ops.live import live_channels
from tests import reference


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@contextmanager
def _spy_live() -> Iterator[list[torch.Tensor | None]]:
    """What every call of ``live_channels`` returned, in order."""
    seen: list[torch.Tensor | None] = []
    real = kernels.live_channels

    def spy(dy: torch.Tensor) -> torch.Tensor | None:
        seen.append(real(dy))
        return seen[-1]

    kernels.live_channels = spy
    try:
        yield seen
    finally:
        kernels.live_channels = real


def _two_layers(layout: torch.memory_format, sampled: bool, method: str = "topk") -> tuple[torch.Tensor, ...]:
    """conv(40->24) -> ReLU -> max pool -> conv(24->6), both sampled (or both dense references)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 40, 10, 10, generator=g) * torch.linspace(0.2, 2, 40).view(1, -1, 1, 1)).clone(
        memory_format=layout
    )
    x.requires_grad_(True)
    w1 = torch.randn(24, 40, 3, 3, generator=g).requires_grad_(True)
    b1 = torch.randn(24, generator=g).requires_grad_(True)
    w2 = torch.randn(6, 24, 3, 3, generator=g).requires_grad_(True)
    b2 = torch.randn(6, generator=g).requires_grad_(True)
    if sampled:
        h = sampled_conv(
            x, w1, b1, 1, 1, 1, keep=0.4, method=method, generator=torch.Generator().manual_seed(3)
        )
        h = F.max_pool2d(F.relu(h), 2)
        y = sampled_conv(
            h, w2, b2, 1, 1, 1, keep=0.25, method=method, generator=torch.Generator().manual_seed(4)
        )
    else:
        h = reference.conv(x, w1, b1, 16, method, 3, 1, 1, 1)  # keep 0.4 of 40
        h = F.max_pool2d(F.relu(h), 2)
        y = reference.conv(h, w2, b2, 6, method, 4, 1, 1, 1)  # keep 0.25 of 24
    y.pow(2).sum().backward()
    assert x.grad is not None and w1.grad is not None and b1.grad is not None and w2.grad is not None
    return y.detach(), x.grad, w1.grad, b1.grad, w2.grad


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("method", ["topk", "crs"])
def test_backward_over_live_channels_matches_the_dense_reference(
    layout: torch.memory_format, method: str
) -> None:
    with _spy_live() as seen:
        got = _two_layers(layout, sampled=True, method=method)
    # backward runs the second conv first: its dy is dense; the first conv's dy is live only
    # on the (at most) 6 channels of 24 the second conv kept
    assert len(seen) == 2 and seen[0] is None
    live = seen[1]
    assert live is not None and 0 < live.numel() <= 6
    assert got[1].is_contiguous(memory_format=layout)
    want = _two_layers(torch.contiguous_format, sampled=False, method=method)
    for g, w in zip(got, want, strict=True):
        _close(g, w)
    dead = torch.ones(24, dtype=torch.bool)
    dead[live] = False
    assert (got[2][dead] == 0).all() and (got[3][dead] == 0).all()  # dW rows and db of dead channels


def test_live_channels_are_exact() -> None:
    """Tiny values (whose squares underflow), negative-only channels and NaN all count as live."""
    dy = torch.zeros(4, 8, 5, 5)
    dy[2, 1, 3, 3] = 1e-30
    dy[:, 4] = -torch.rand(4, 5, 5) - 0.1
    dy[3, 6, 0, 0] = float("nan")
    for t in (dy, dy.contiguous(memory_format=torch.channels_last)):
        live = live_channels(t)
        assert live is not None and live.tolist() == [1, 4, 6]
    assert live_channels(torch.randn(4, 8, 5, 5)) is None  # dense: no slicing
    dense = torch.zeros(4, 8, 5, 5)
    dense[1] = 1.0  # every channel live, but not in the first sample
    assert live_channels(dense) is None
    dy[:, :7] = 1.0  # 7 of 8 live: above LIVE_MAX, not worth slicing
    assert live_channels(dy) is None
    assert live_channels(torch.zeros(4, 8, 5, 5)).numel() == 0  # type: ignore[union-attr]
    conv1d = torch.zeros(4, 8, 9)
    conv1d[:, 2] = 1.0
    assert live_channels(conv1d).tolist() == [2]  # type: ignore[union-attr]
    assert live_channels(conv1d.transpose(0, 2).contiguous().transpose(0, 2)) is None  # odd layout: no copy


def test_all_zero_output_gradient_gives_zero_gradients() -> None:
    x = torch.randn(2, 20, 6, 6, requires_grad=True)
    w, b = torch.randn(5, 20, 3, 3, requires_grad=True), torch.randn(5, requires_grad=True)
    (sampled_conv(x, w, b, 1, 1, 1, keep=0.5) * 0).sum().backward()
    for g in (x.grad, w.grad, b.grad):
        assert g is not None and (g == 0).all()


def test_backward_allocates_no_gradient_for_the_saved_slices() -> None:
    """The op's extra outputs (the gathered slices) get no zero-filled gradient in backward."""
    x = torch.randn(2, 40, 8, 8, requires_grad=True)
    w = torch.randn(6, 40, 3, 3, requires_grad=True)
    y = sampled_conv(x, w, None, 1, 1, 1, keep=0.3)  # 12 of 40 channels: xs is (2, 12, 8, 8)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        y.sum().backward()
    shapes = [
        e.input_shapes for e in prof.events() if e.name in ("aten::zeros", "aten::zero_", "aten::fill_")
    ]
    assert [2, 12, 8, 8] not in [s[0] if s else None for s in shapes]
    assert x.grad is not None and w.grad is not None


@pytest.mark.parametrize(
    ("need_x", "need_w", "need_b"),
    [(True, True, True), (True, False, False), (False, True, False), (False, False, True)],
)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_live_backward_equals_the_full_backward_for_every_gradient_mask(
    need_x: bool, need_w: bool, need_b: bool, layout: torch.memory_format
) -> None:
    g = torch.Generator().manual_seed(2)
    dy = torch.zeros(3, 16, 6, 6)
    dy[:, [1, 5, 6, 11]] = torch.randn(3, 4, 6, 6, generator=g)
    dy = dy.contiguous(memory_format=layout)
    xs = torch.randn(3, 5, 6, 6, generator=g).contiguous(memory_format=layout)
    ws = torch.randn(16, 5, 3, 3, generator=g)
    index, scale = torch.tensor([0, 2, 3, 7, 9]), torch.tensor([1.5, 2.0, 1.0, 3.0, 2.5])
    args = (dy, xs, ws, index, scale, [3, 10, 6, 6], [16, 10, 3, 3], True, [1, 1], [1, 1], [1, 1])
    with _spy_live() as seen:
        got = [t.clone() for t in kernels.sampled_conv_product_backward(*args, need_x, need_w, need_b)]
    assert seen[0] is not None and seen[0].tolist() == [1, 5, 6, 11]
    real = kernels.live_channels
    kernels.live_channels = lambda dy: None  # the products over every output channel
    try:
        want = kernels.sampled_conv_product_backward(*args, need_x, need_w, need_b)
    finally:
        kernels.live_channels = real
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        if a.numel():
            _close(a, b)


def test_bias_only_training_gets_the_exact_bias_gradient() -> None:
    """Frozen input and weight, trainable bias (as in bias-only fine-tuning)."""
    x, w = torch.randn(2, 20, 5, 5), torch.randn(3, 20, 3, 3)
    b = torch.randn(3, requires_grad=True)
    sampled_conv(x, w, b, 1, 1, 1, keep=0.5).sum().backward()
    torch.testing.assert_close(b.grad, torch.full((3,), 2.0 * 5 * 5))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("kept", [[0, 3, 4, 9], []])
def test_channel_gather_matches_indexing_and_keeps_the_layout(
    layout: torch.memory_format, kept: list[int]
) -> None:
    x = torch.randn(3, 10, 5, 6).contiguous(memory_format=layout)
    index = torch.tensor(kept, dtype=torch.long)
    got = kernels._gather_channels(x, index)
    assert torch.equal(got, x[:, index])
    if kept and layout == torch.channels_last:
        assert got.is_contiguous(memory_format=layout) and not got.is_contiguous()


# -- exact convs in front of a sampled conv ----------------------------------------------------


def _dead_channel_grad(c: int, live: list[int]) -> torch.Tensor:
    dy = torch.zeros(3, c, 6, 6)
    dy[:, live] = torch.randn(3, len(live), 6, 6, generator=torch.Generator().manual_seed(5))
    return dy


@pytest.mark.parametrize("dense", [False, True])
def test_exact_conv_in_training_skips_dead_channels_with_the_same_gradients(dense: bool) -> None:
    """``sampled_conv(keep=1.0)`` in training is F.conv2d, and its backward F.conv2d's gradients."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 6, 6, generator=g, requires_grad=True)
    w = torch.randn(8, 5, 3, 3, generator=g, requires_grad=True)
    b = torch.randn(8, generator=g, requires_grad=True)
    dy = torch.randn(3, 8, 6, 6, generator=g) if dense else _dead_channel_grad(8, [1, 6])
    with _spy_live() as seen:
        y = sampled_conv(x, w, b, 1, 1, keep=1.0)
        assert type(y.grad_fn).__name__ == "_LiveConvBackward"
        got = torch.autograd.grad(y, (x, w, b), dy)
    assert len(seen) == 1 and (seen[0] is None) == dense
    if not dense:
        assert seen[0] is not None and seen[0].tolist() == [1, 6]
    want_y = F.conv2d(x, w, b, 1, 1)
    torch.testing.assert_close(y, want_y, rtol=0, atol=0)
    for a, e in zip(got, torch.autograd.grad(want_y, (x, w, b), dy), strict=True):
        _close(a, e)


def test_exact_conv_double_backward_takes_the_differentiable_path() -> None:
    """create_graph=True: gradients of gradients equal F.conv2d's (a gradient penalty trains)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 5, 5, generator=g, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, generator=g, requires_grad=True)
    dy = _dead_channel_grad(6, [0, 2])[:2, :, :5, :5]

    def penalty(conv: object) -> tuple[torch.Tensor, ...]:
        y = conv(x, w, None, 1, 1)  # type: ignore[operator]
        (gx,) = torch.autograd.grad(y, x, dy, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), w)  # dx does not depend on x

    live = penalty(lambda *a: sampled_conv(*a, keep=1.0))
    for a, e in zip(live, penalty(F.conv2d), strict=True):
        _close(a, e)


def test_exact_convs_before_a_sampled_conv_are_rewritten_and_hooked_ones_are_not() -> None:
    import approxcompile
    from approxcompile.ops import SAMPLED_OPS

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Conv2d(3, 32, 3, padding=1)  # first: exact, feeds the sampled b
            self.b = torch.nn.Conv2d(32, 32, 3, padding=1)
            self.c = torch.nn.Conv2d(32, 32, 3, padding=1)  # last conv: exact, feeds no product
            self.head = torch.nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.max_pool2d(F.relu(self.a(x)), 2)
            x = F.relu(self.c(F.relu(self.b(x))))
            return self.head(x.mean(dim=(2, 3)))

    x = torch.randn(4, 3, 8, 8)
    config = approxcompile.ApproxConfig().set_module_name("b", approxcompile.NodeOverride(keep=0.5))
    config = config.set_module_name("c", approxcompile.NodeOverride(exact=True))

    def calls(model: torch.nn.Module) -> dict[str, float]:
        fast = approxcompile.optimize(model, 0.9, example_inputs=(x,), config=config)
        return {
            str(n.args[1].target).split(".")[0]: n.kwargs["keep"]
            for n in fast.graph.nodes
            if n.op == "call_function" and n.target in SAMPLED_OPS
        }

    torch.manual_seed(0)
    assert calls(Net()) == {"a": 1.0, "b": 0.5}
    hooked = Net()
    hooked.a.register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning):  # the plan's own warnings; no hook warning for the exact a
        assert calls(hooked) == {"b": 0.5}


def _compiled_live_grads(
    live: int, need_x: bool
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Gradients of ``sampled_conv(keep=1.0, live=live)`` compiled (fullgraph) and of F.conv2d.

    Output channels 1 and 4 of 6 get a gradient, the rest none.
    """
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 6, 6, generator=g, requires_grad=need_x)
    w = torch.randn(6, 16, 3, 3, generator=g, requires_grad=True)
    b = torch.randn(6, generator=g, requires_grad=True)
    dy = _dead_channel_grad(6, [1, 4])[:2]
    inputs = (x, w, b) if need_x else (w, b)

    def conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return sampled_conv(x, w, b, 1, 1, keep=1.0, live=live).relu()

    torch._dynamo.reset()  # the bound is a constant of the traced graph
    compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, w, b), inputs, dy)
    want = torch.autograd.grad(F.conv2d(x, w, b, 1, 1).relu(), inputs, dy)
    return got, want


@pytest.mark.parametrize("need_x", [True, False])
def test_compiled_exact_conv_with_a_live_bound_gives_the_plain_gradients(need_x: bool) -> None:
    """Under torch.compile the live backward runs at static shapes: exact while the bound holds.

    A bound below the live count (1 of the 2 live channels) loses a channel's gradient, which
    shows that the compiled backward did skip channels.
    """
    got, want = _compiled_live_grads(2, need_x)
    for a, e in zip(got, want, strict=True):
        _close(a, e)
    narrow, want = _compiled_live_grads(1, need_x)
    assert not torch.allclose(narrow[-2], want[-2])  # dW: one of the live channels' rows is zero


def test_compiled_live_bound_is_taken_only_where_it_pays() -> None:
    """Thin products (few multiply-adds per element of dy) keep the plain backward."""
    w = torch.randn(128, 3, 3, 3, requires_grad=True)
    x = torch.randn(2, 3, 8, 8)
    assert not kernels._traced_live_pays(x, w, 16)  # the CNN's first conv: 24 saved per element
    w = torch.randn(128, 128, 3, 3, requires_grad=True)
    assert kernels._traced_live_pays(x.new_empty(2, 128, 8, 8).requires_grad_(), w, 96)
    assert not kernels._traced_live_pays(x.new_empty(2, 128, 8, 8).requires_grad_(), w, 97)  # > LIVE_MAX


def test_rewrite_bounds_the_live_channels_only_where_all_uses_reach_sampled_convs() -> None:
    """``live=``: what the sampled convs behind channel-wise ops keep; none where another use sees y."""
    import approxcompile
    from approxcompile.ops import SAMPLED_OPS

    class Net(torch.nn.Module):
        def __init__(self, side: bool) -> None:
            super().__init__()
            self.side = side
            self.a = torch.nn.Conv2d(3, 32, 3, padding=1)
            self.b = torch.nn.Conv2d(32, 32, 3, padding=1)
            self.head = torch.nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.max_pool2d(F.relu(self.a(x)), 2)
            y = F.relu(self.b(h)).mean(dim=(2, 3))
            return self.head(y + h.mean(dim=(2, 3)) if self.side else y)

    x = torch.randn(4, 3, 8, 8)
    config = approxcompile.ApproxConfig().set_module_name("b", approxcompile.NodeOverride(keep=0.25))

    def live(model: torch.nn.Module, budget: float | None = None) -> dict[str, object]:
        fast = approxcompile.optimize(model, 0.9, example_inputs=(x,), config=config)
        if budget is not None:
            approxcompile.set_budget(fast, budget)
        return {
            str(n.args[1].target).split(".")[0]: n.kwargs.get("live")
            for n in fast.graph.nodes
            if n.op == "call_function" and n.target in SAMPLED_OPS
        }

    torch.manual_seed(0)
    assert live(Net(side=False)) == {"a": 8, "b": None}
    assert live(Net(side=True)) == {"a": None, "b": None}  # h also reaches the head


def test_set_budget_writes_the_live_bounds_again() -> None:
    """The bound follows the sampled conv's keep; an exact one bounds nothing (dense gradients)."""
    import approxcompile
    from approxcompile.ops import SAMPLED_OPS

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Conv2d(3, 32, 3, padding=1)
            self.b = torch.nn.Conv2d(32, 32, 3, padding=1)
            self.head = torch.nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(F.relu(self.b(F.relu(self.a(x)))).mean(dim=(2, 3)))

    torch.manual_seed(0)
    config = approxcompile.ApproxConfig(exclude_first_last=False)
    fast = approxcompile.optimize(Net(), 0.5, example_inputs=(torch.randn(4, 3, 8, 8),), config=config)

    def calls() -> dict[str, tuple[float, int | None]]:
        return {
            str(n.args[1].target).split(".")[0]: (n.kwargs["keep"], n.kwargs.get("live"))
            for n in fast.graph.nodes
            if n.op == "call_function" and n.target in SAMPLED_OPS and n.args[1].target != "head.weight"
        }

    keep_a, live_a = calls()["a"]
    keep_b, _ = calls()["b"]
    assert keep_a == 1.0 and keep_b < 1.0 and live_a == round(keep_b * 32)
    approxcompile.set_budget(fast, 1.0)
    assert calls() == {"a": (1.0, None), "b": (1.0, None)}
