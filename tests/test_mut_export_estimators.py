"""The exportable twins against dense references, and their ONNX gathers in ONNX Runtime.

Written for the mutants of ``approxcompile/export/estimators.py``. The reference for a sampled
product is the exact op on the operand multiplied by a per-pair scale vector (0 for pairs not
kept), the pairs and scales taken from the *runtime* sampler ``sample_pairs`` on the same
noise, and the norms computed here; autograd through that product gives the gradients, so
nothing of the twin's gather, scatter or gradient stop is reused.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from approxcompile.export import estimators
from approxcompile.ops import estimator, sample_pairs
from approxcompile.plan import kept_count

METHODS = ("topk", "crs", "bernoulli", "uniform")


def _norms(t: Tensor, dim: int) -> Tensor:
    return torch.linalg.vector_norm(t.detach().double().movedim(dim, 0).reshape(t.shape[dim], -1), dim=1)


def _scale_vector(scores: Tensor, k: int, method: str, noise: Tensor | None) -> Tensor:
    """Per-pair total scale (0 where not kept) from the runtime sampler."""
    n = scores.numel()
    index, scale = sample_pairs(scores.float(), k, method, noise=noise)
    each = torch.ones(index.numel()) if scale is None else scale.float()
    return torch.zeros(n).index_add_(0, index, each)


def _noise(method: str, n: int, k: int, seed: int) -> Tensor:
    return torch.rand(estimator.noise_size(method, n, k), generator=torch.Generator().manual_seed(seed))


def _leaves(*ts: Tensor | None) -> list[Tensor | None]:
    return [None if t is None else t.clone().requires_grad_() for t in ts]


def _check_grads(got: list[Tensor | None], want: list[Tensor | None], transposed: bool = False) -> None:
    """Leaf gradients equal; ``transposed``: the second leaf is stored transposed in ``got``."""
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g is None:
            assert w is None
            continue
        assert g.grad is not None and w is not None and w.grad is not None
        grad = g.grad.t() if transposed and i == 1 else g.grad
        torch.testing.assert_close(grad, w.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("transposed", [False, True])
def test_export_linear_is_the_masked_dense_product(method: str, transposed: bool) -> None:
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(2, 5, 16, generator=g), torch.randn(6, 16, generator=g), torch.randn(6)
    k = kept_count(0.25, 16)
    for seed in range(2):
        noise = _noise(method, 16, k, seed)
        got = _leaves(x, w.t().contiguous() if transposed else w, b)
        out = estimators.export_linear(
            got[0],
            got[1],
            got[2],
            keep=0.25,
            method=method,
            noise=noise,
            transposed=transposed,  # type: ignore[arg-type]
        )
        want = _leaves(x, w, b)
        s = _scale_vector(_norms(x, -1) * _norms(w, 1), k, method, noise)
        ref = F.linear(want[0] * s, want[1], want[2])  # type: ignore[operator]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        out.square().sum().backward()
        ref.square().sum().backward()
        _check_grads(got, want, transposed)  # the stored weight is W^T: so is its gradient


def test_export_linear_transposed_without_bias_and_exact_paths() -> None:
    g = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(3, 8, generator=g), torch.randn(4, 8, generator=g), torch.randn(4, generator=g)
    exact = x @ w.t() + b
    # eval, and keep 1.0, run the exact product in either layout
    for kw in ({"training": False, "keep": 0.25}, {"training": True, "keep": 1.0, "method": "crs"}):
        torch.testing.assert_close(estimators.export_linear(x, w, b, **kw), exact)  # type: ignore[arg-type]
        torch.testing.assert_close(
            estimators.export_linear(x, w.t(), b, transposed=True, **kw),  # type: ignore[arg-type]
            exact,
        )
        torch.testing.assert_close(
            estimators.export_linear(x, w.t(), None, transposed=True, **kw),  # type: ignore[arg-type]
            x @ w.t(),
        )
    # transposed: n is the first axis of the stored (in, out) weight: 8 inputs, keep 0.5 -> 4
    x2 = torch.zeros(3, 8)
    x2[:, 4:] = 1.0  # only the last four inputs carry anything: topk keeps exactly them
    got = estimators.export_linear(x2, w.t(), None, keep=0.5, transposed=True)
    torch.testing.assert_close(got, x2 @ w.t())


def _matmul_reference(a: Tensor, b: Tensor, k: int, method: str, noise: Tensor | None) -> Tensor:
    s = _scale_vector(_norms(a, -1) * _norms(b, -2), k, method, noise)
    return torch.matmul(a * s, b)


@pytest.mark.parametrize("method", METHODS)
def test_export_matmul_addmm_baddbmm_are_the_masked_dense_products(method: str) -> None:
    g = torch.Generator().manual_seed(5)
    n, k = 12, kept_count(0.25, 12)
    a3, b3, bias3 = torch.randn(2, 4, n, generator=g), torch.randn(2, n, 3, generator=g), torch.randn(2, 1, 3)
    a2, b2, bias2 = torch.randn(4, n, generator=g), torch.randn(n, 3, generator=g), torch.randn(3)
    noise = _noise(method, n, k, 7)
    cases = [
        (
            lambda a, b, c: estimators.export_matmul(a, b, keep=0.25, method=method, noise=noise),
            (a3, b3, None),
        ),
        (
            lambda a, b, c: estimators.export_baddbmm(c, a, b, keep=0.25, method=method, noise=noise),
            (a3, b3, bias3),
        ),
        (
            lambda a, b, c: estimators.export_addmm(c, a, b, keep=0.25, method=method, noise=noise),
            (a2, b2, bias2),
        ),
    ]
    for op, (a, b, c) in cases:
        got = _leaves(a, b, c)
        out = op(*got)
        want = _leaves(a, b, c)
        ref = _matmul_reference(want[0], want[1], k, method, noise)  # type: ignore[arg-type]
        if c is not None:
            ref = ref + want[2]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        out.square().sum().backward()
        ref.square().sum().backward()
        _check_grads(got, want)


def test_export_matmul_family_exact_paths() -> None:
    g = torch.Generator().manual_seed(6)
    a, b, v = torch.randn(4, 8, generator=g), torch.randn(8, 3, generator=g), torch.randn(8, generator=g)
    c, bias = torch.randn(2, 4, 8, generator=g), torch.randn(3)
    cb = torch.randn(2, 8, 3, generator=g)
    for kw in ({"training": False, "keep": 0.25}, {"training": True, "keep": 1.0, "method": "crs"}):
        torch.testing.assert_close(estimators.export_matmul(a, b, **kw), a @ b)  # type: ignore[arg-type]
        torch.testing.assert_close(estimators.export_addmm(bias, a, b, **kw), a @ b + bias)  # type: ignore[arg-type]
        torch.testing.assert_close(
            estimators.export_baddbmm(bias, c, cb, **kw),  # type: ignore[arg-type]
            c @ cb + bias,
        )
    # a vector operand is never sampled (the product has no slices to keep)
    torch.testing.assert_close(estimators.export_matmul(a, v, keep=0.25), a @ v)
    torch.testing.assert_close(estimators.export_matmul(v, b, keep=0.25), v @ b)


@pytest.mark.parametrize("method", METHODS)
def test_export_conv_is_the_masked_dense_convolution(method: str) -> None:
    g = torch.Generator().manual_seed(8)
    x, w, b = torch.randn(2, 12, 7, 7, generator=g), torch.randn(5, 12, 3, 3, generator=g), torch.randn(5)
    k = kept_count(0.25, 12)
    noise = _noise(method, 12, k, 9)
    got = _leaves(x, w, b)
    out = estimators.export_conv(got[0], got[1], got[2], 2, 1, 1, keep=0.25, method=method, noise=noise)  # type: ignore[arg-type]
    want = _leaves(x, w, b)
    s = _scale_vector(_norms(x, 1) * _norms(w, 1), k, method, noise).view(1, 12, 1, 1)
    ref = F.conv2d(want[0] * s, want[1], want[2], 2, 1, 1)  # type: ignore[operator]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    _check_grads(got, want)


def test_export_conv_exact_paths() -> None:
    g = torch.Generator().manual_seed(10)
    x, w, b = torch.randn(2, 8, 6, generator=g), torch.randn(3, 8, 3, generator=g), torch.randn(3)
    want = F.conv1d(x, w, b, 1, 1, 1)
    for kw in ({"training": False, "keep": 0.25}, {"training": True, "keep": 1.0, "method": "crs"}):
        torch.testing.assert_close(estimators.export_conv(x, w, b, 1, 1, 1, **kw), want)  # type: ignore[arg-type]
    # stride 1, padding 0, dilation 1 by default
    x2, w2 = torch.randn(1, 4, 6, 6, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    torch.testing.assert_close(estimators.export_conv(x2, w2, keep=0.5, training=False), F.conv2d(x2, w2))
    # an unbatched input (C, L) is left exact
    torch.testing.assert_close(
        estimators.export_conv(x[0], w, b, 1, 1, 1, keep=0.25),
        F.conv1d(x[0], w, b, 1, 1, 1),
    )


def test_sample_without_noise_draws_the_right_number_of_pairs() -> None:
    torch.manual_seed(0)
    scores = torch.rand(20)
    for method, count in (("crs", 5), ("uniform", 5), ("topk", 5)):
        index, scale = estimators.sample(scores, 5, method)
        assert index.numel() == count and index.dtype == torch.int64
        assert torch.equal(index, torch.sort(index).values)
    index, scale = estimators.sample(scores, 5, "uniform")
    assert scale is not None and scale.tolist() == [4.0] * 5 and index.unique().numel() == 5
    with pytest.raises(ValueError, match="unknown sampling method 'nope'"):
        estimators.sample(scores, 5, "nope")


def test_bernoulli_scales_are_one_over_the_keep_probability() -> None:
    # scores (1, 1, 2), eps 0: p = (0.25, 0.25, 0.5); k 2 -> q = (0.5, 0.5, 1)
    # u = (0.4, 0.6, 0.99): keep 0 (0.4 < 0.5) and 2; scales 1/0.5 = 2 and 1
    index, scale = estimators.sample(
        torch.tensor([1.0, 1.0, 2.0]), 2, "bernoulli", eps=0.0, noise=torch.tensor([0.4, 0.6, 0.99])
    )
    assert index.tolist() == [0, 2] and scale is not None and scale.tolist() == [2.0, 1.0]
    # crs: p (0.25, 0.25, 0.5), k 2, u (0.9, 0.3) -> pairs 2, 1 sorted; scales 1/(2·0.25) = 2, 1/(2·0.5) = 1
    index, scale = estimators.sample(
        torch.tensor([1.0, 1.0, 2.0]), 2, "crs", eps=0.0, noise=torch.tensor([0.9, 0.3])
    )
    assert index.tolist() == [1, 2] and scale is not None and scale.tolist() == [2.0, 1.0]


def test_take_gathers_and_scatters_back_repeats_added() -> None:
    t = torch.arange(12.0).view(2, 3, 2).requires_grad_()
    out = estimators.take(t, 1, torch.tensor([2, 0, 2]))
    assert out.tolist() == [[[4, 5], [0, 1], [4, 5]], [[10, 11], [6, 7], [10, 11]]]
    out.sum().backward()
    # slice 2 taken twice, slice 0 once, slice 1 never
    assert t.grad is not None
    assert t.grad[:, 2].tolist() == [[2, 2], [2, 2]] and t.grad[:, 0].tolist() == [[1, 1], [1, 1]]
    assert t.grad[:, 1].abs().sum() == 0
    assert estimators.take(torch.arange(6.0).view(3, 2), -2, torch.tensor([1])).tolist() == [[2, 3]]


def test_stop_gradient_keeps_values_and_dtype() -> None:
    v = torch.tensor([0.0, 1.0, 0.1, 3.0e-30, 7.5e30, 1 / 3], requires_grad=True)
    out = estimators.stop_gradient(v)
    assert torch.equal(out, v.detach()) and not out.requires_grad and out.dtype == torch.float32
    h = torch.tensor([0.0, 0.1, 1000.0], dtype=torch.float16)
    assert torch.equal(estimators.stop_gradient(h), h) and estimators.stop_gradient(h).dtype == torch.float16


class _Gather(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: Tensor, index: Tensor) -> Tensor:
        return estimators.take(t, self.dim, index)


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_take_exports_a_gather_onnx_runtime_runs_as_index_select(dim: int) -> None:
    ort = pytest.importorskip("onnxruntime")
    t = torch.arange(24.0).view(2, 3, 4)
    index = torch.tensor([1, 0])
    buf = io.BytesIO()
    torch.onnx.export(_Gather(dim), (t, index), buf, input_names=["t", "i"], dynamo=False)
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"t": t.numpy(), "i": index.numpy()})
    assert got.tolist() == t.index_select(dim, index).tolist()


class _BernoulliConv(torch.nn.Module):
    def forward(self, x: Tensor, w: Tensor, noise: Tensor) -> Tensor:
        return estimators.export_conv(x, w, None, 1, 1, 1, keep=0.5, method="bernoulli", noise=noise)


def test_bernoulli_conv_exports_and_runs_in_onnx_runtime() -> None:
    # Bernoulli keeps a data-dependent channel count: the twin zeroes the channels not drawn
    # instead of gathering, or the exporter could not give the Conv a kernel shape.
    ort = pytest.importorskip("onnxruntime")
    g = torch.Generator().manual_seed(11)
    x, w, noise = (
        torch.randn(2, 6, 5, 5, generator=g),
        torch.randn(4, 6, 3, 3, generator=g),
        torch.rand(6, generator=g),
    )
    buf = io.BytesIO()
    torch.onnx.export(_BernoulliConv(), (x, w, noise), buf, input_names=["x", "w", "u"], dynamo=False)
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy(), "w": w.numpy(), "u": noise.numpy()})
    s = _scale_vector(_norms(x, 1) * _norms(w, 1), 3, "bernoulli", noise).view(1, 6, 1, 1)
    torch.testing.assert_close(torch.from_numpy(got), F.conv2d(x * s, w, None, 1, 1, 1), rtol=1e-4, atol=1e-4)


def test_the_twins_take_their_options_by_keyword() -> None:
    a, b = torch.randn(2, 4), torch.randn(4, 3)
    with pytest.raises(TypeError):
        estimators.export_matmul(a, b, 0.5)  # type: ignore[misc]
    with pytest.raises(TypeError):
        estimators.export_addmm(torch.zeros(3), a, b, 0.5)  # type: ignore[misc]
    with pytest.raises(TypeError):
        estimators.export_linear(a, b.t(), None, 0.5)  # type: ignore[misc]


class _TopkLinear(torch.nn.Module):
    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        return estimators.export_linear(x, w, None, keep=0.25, method="topk")


def test_topk_linear_exports_and_runs_in_onnx_runtime() -> None:
    ort = pytest.importorskip("onnxruntime")
    x = torch.zeros(3, 16)
    x[:, [2, 5, 9, 14]] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # the four columns top-k keeps
    x[:, 0] = 0.1
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(12))
    buf = io.BytesIO()
    torch.onnx.export(_TopkLinear(), (x, w), buf, input_names=["x", "w"], dynamo=False)
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy(), "w": w.numpy()})
    keep = torch.zeros(16)
    keep[[2, 5, 9, 14]] = 1.0
    torch.testing.assert_close(torch.from_numpy(got), (x * keep) @ w.t(), rtol=1e-5, atol=1e-5)
