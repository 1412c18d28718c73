"""The sampled ops on every available device, and under autocast with PyTorch's dtype rules.

CUDA cases run where a GPU is present and are skipped elsewhere; CPU cases always run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from approxcompile.ops import backward_sampled_conv, backward_sampled_linear, sampled_conv, sampled_linear
from approxcompile.ops.sampled import _sample_slices

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
METHODS = ("topk", "crs", "bernoulli", "uniform", "wta_crs")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
def test_sampled_linear_runs_and_matches_its_reference_on_device(device: str, method: str) -> None:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(12, 40, device=device, generator=g, requires_grad=True)
    w = torch.randn(6, 40, device=device, generator=g, requires_grad=True)
    y = sampled_linear(x, w, None, keep=0.3, method=method, generator=torch.Generator(device).manual_seed(3))
    y.square().sum().backward()
    assert y.device.type == device and x.grad is not None and w.grad is not None
    assert w.grad.device.type == device
    got = (y.detach(), x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    xs, ws = _sample_slices(x, -1, w, 1, 12, method, 0.1, torch.Generator(device).manual_seed(3))
    ref = F.linear(xs, ws)
    ref.square().sum().backward()
    for a, b in zip(got, (ref.detach(), x.grad, w.grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    if method != "bernoulli":  # bernoulli draws a random count
        assert (got[2] == 0).all(dim=0).sum() >= 40 - 12  # columns not drawn get no gradient


@pytest.mark.parametrize("device", DEVICES)
def test_weight_streams_and_backward_sampling_stay_on_device(device: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 6, 8, 8, device=device, requires_grad=True)
    w = torch.randn(5, 6, 3, 3, device=device, requires_grad=True)
    y = sampled_conv(x, w, None, 1, 1, 1, keep=0.5, method="crs", scores="weights", seed=7)
    y.sum().backward()
    assert w.grad is not None and w.grad.device.type == device
    lx = torch.randn(16, 32, device=device, requires_grad=True)
    lw = torch.randn(8, 32, device=device, requires_grad=True)
    backward_sampled_linear(lx, lw, None, keep=0.5, row_scores="x").sum().backward()
    backward_sampled_conv(x, w, None, 1, 1, 1, keep=0.5).sum().backward()
    assert lx.grad is not None and lx.grad.device.type == device and lw.grad is not None


def _autocast_devices() -> list:
    cases = [pytest.param("cpu", torch.bfloat16, id="cpu-bf16")]
    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    cases += [pytest.param("cuda", dt, marks=cuda, id=f"cuda-{dt}") for dt in (torch.float16, torch.bfloat16)]
    return cases


@pytest.mark.parametrize(("device", "dtype"), _autocast_devices())
@pytest.mark.parametrize("backward_mode", [False, True])
def test_autocast_computes_in_the_autocast_dtype_like_the_exact_op(
    device: str, dtype: torch.dtype, backward_mode: bool
) -> None:
    """Under autocast a sampled linear / conv returns what F.linear / F.conv2d would: the autocast
    dtype; float32 parameters get float32 gradients; mixed input dtypes do not crash."""
    torch.manual_seed(0)
    x = torch.randn(8, 32, device=device, requires_grad=True)
    w = torch.randn(16, 32, device=device, requires_grad=True)
    b = torch.randn(16, device=device, requires_grad=True)
    img = torch.randn(2, 8, 6, 6, device=device).to(dtype)  # already low precision, as after a layer
    kern = torch.randn(4, 8, 3, 3, device=device, requires_grad=True)
    with torch.autocast(device, dtype=dtype):
        if backward_mode:
            y = backward_sampled_linear(x, w, b, keep=0.5)
            z = backward_sampled_conv(img, kern, None, 1, 1, 1, keep=0.5)
        else:
            y = sampled_linear(x, w, b, keep=0.5)  # topk: a deterministic error bound below
            z = sampled_conv(img, kern, None, 1, 1, 1, keep=0.5)
        want = (F.linear(x, w, b).dtype, F.conv2d(img, kern, None, 1, 1).dtype)
    assert (y.dtype, z.dtype) == want == (dtype, dtype)
    (y.float().sum() + z.float().sum()).backward()
    for t in (x, w, b, kern):
        assert t.grad is not None and t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all()
    if not backward_mode:  # the forward is a sampled product: compare with the exact one, loosely
        exact = F.linear(x, w, b)
        rel = (y.float() - exact).norm() / exact.norm()
        assert rel < 1.0


def test_float64_stays_float64_under_autocast() -> None:
    x = torch.randn(8, 32, dtype=torch.float64)
    w = torch.randn(16, 32, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sampled_linear(x, w, None, keep=0.5).dtype == torch.float64  # autocast leaves float64
