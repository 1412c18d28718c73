"""The sampled linear under autocast: only the gathered slices are cast, gradients in each input's dtype.

Before, ``sampled_linear`` cast the whole float32 weight to bfloat16 every step before the
gather and got its weight gradient back in bfloat16, which autograd then cast into a fresh
float32 tensor. Now the op takes the autocast dtype (``compute``) and casts the ``(M, k)``
input slice and the ``(p, k)`` weight columns only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from approxcompile.ops import sampled_linear
from approxcompile.ops.draw import draw_pairs
from approxcompile.ops.kernels import column_norms

ops = torch.ops.approxcompile


def _casts(fn):
    """Run ``fn`` recording the shape of every float32 -> bfloat16 ``Tensor.to``."""
    seen: list[tuple[int, ...]] = []
    original = torch.Tensor.to

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.dtype == torch.float32 and out.dtype == torch.bfloat16:
            seen.append(tuple(self.shape))
        return out

    torch.Tensor.to = spy  # type: ignore[method-assign]
    try:
        result = fn()
    finally:
        torch.Tensor.to = original  # type: ignore[method-assign]
    return result, seen


def _leaves(x_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 64, generator=g).to(x_dtype).requires_grad_()
    w = torch.randn(32, 64, generator=g).requires_grad_()
    b = torch.randn(32, generator=g).requires_grad_()
    return x, w, b


def test_only_the_gathered_slices_are_cast_and_results_match_autocast_on_the_slices() -> None:
    x, w, b = _leaves()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, casts = _casts(lambda: sampled_linear(x, w, b, keep=0.5))  # topk: k = 32 of 64
    assert y.dtype == torch.bfloat16
    assert (32, 64) not in casts, "the whole weight was cast"
    assert casts and {(24, 32), (32, 32)} <= set(casts), casts
    y.float().square().sum().backward()
    assert (x.grad.dtype, w.grad.dtype, b.grad.dtype) == (torch.float32,) * 3

    # Reference: the same columns gathered in float32, then autocast's own F.linear on them.
    rx, rw, rb = _leaves()
    index = draw_pairs(column_norms(rx.detach()) * column_norms(rw.detach()), rw, 32, "topk", eps=0.1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.linear(rx.index_select(1, index), rw.index_select(1, index), rb)
    ref.float().square().sum().backward()
    assert torch.equal(y, ref)
    for got, want in ((x.grad, rx.grad), (w.grad, rw.grad), (b.grad, rb.grad)):
        assert torch.allclose(got, want, rtol=2e-2, atol=2e-2)
    # the unsampled weight columns get no gradient, as autograd through index_select gives
    dropped = torch.ones(64, dtype=torch.bool)
    dropped[index] = False
    assert w.grad[:, dropped].abs().sum() == 0 and w.grad[:, index].abs().sum() > 0


def test_a_low_precision_input_gets_its_gradient_in_its_own_dtype() -> None:
    x, w, b = _leaves(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, casts = _casts(lambda: sampled_linear(x, w, b, keep=0.5, method="crs"))
    assert (32, 64) not in casts and y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert (x.grad.dtype, w.grad.dtype, b.grad.dtype) == (torch.bfloat16, torch.float32, torch.float32)


def test_without_autocast_nothing_is_cast() -> None:
    x, w, b = _leaves()
    y, casts = _casts(lambda: sampled_linear(x, w, b, keep=0.5))
    assert casts == [] and y.dtype == torch.float32


@pytest.mark.parametrize("need", [(True, True), (False, True), (True, False)])
def test_the_ops_report_their_dtypes_to_the_compiler(need: tuple[bool, bool]) -> None:
    """Fake kernels and schemas agree with the real kernels in the mixed-dtype case."""
    x, w, b = (t.detach() for t in _leaves())
    index = torch.tensor([1, 5, 9, 20, 33, 40, 51, 60])
    structure = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(
        ops.sampled_linear_product, (x, w.requires_grad_(), b, index, None, True, torch.bfloat16),
        test_utils=structure,
    )  # fmt: skip
    y, xs = ops.sampled_linear_product(x, w, b, index, None, True, torch.bfloat16)
    assert (y.dtype, xs.dtype) == (torch.bfloat16, torch.bfloat16)
    dy = torch.randn(24, 32).bfloat16()
    args = (dy, xs, w.detach(), index, None, [24, 64], 64, True, *need, torch.float32)
    torch.library.opcheck(ops.sampled_linear_product_backward, args, test_utils=structure)
    dx, dw = ops.sampled_linear_product_backward(*args)
    assert dx.dtype == torch.float32 if need[0] else dx.numel() == 0
    if need[1]:
        assert dw.dtype == torch.float32
        want = torch.zeros(32, 64)
        want[:, index] = (dy.t() @ xs).float()
        assert torch.equal(dw, want)
