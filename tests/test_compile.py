"""torch.compile sees a rewritten model whole: custom ops, no graph breaks, the same numbers as eager."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from models import CNN, MLP, Attention

import approxcompile
from approxcompile import ApproxConfig
from approxcompile.ops.draw import draw

ops = torch.ops.approxcompile


def _optimized(model: torch.nn.Module, x: torch.Tensor, method: str = "topk") -> torch.fx.GraphModule:
    torch.manual_seed(0)
    fast = approxcompile.optimize(model, 0.4, example_inputs=(x,), config=ApproxConfig(method=method)).train()
    assert "sampled_" in fast.code  # the rewrite happened: the compiler has custom ops to see
    return fast


def _train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple:
    torch.manual_seed(seed)  # the draws inside the custom ops follow torch's generator
    out = model(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("factory", "shape", "method"),
    [(MLP, (16, 64), "topk"), (MLP, (16, 64), "crs"), (CNN, (4, 1, 8, 8), "uniform")],
)
def test_fullgraph_compile_trains_like_eager(factory: type, shape: tuple[int, ...], method: str) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
    fast = _optimized(factory(), x, method)
    twin = copy.deepcopy(fast)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fast)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    compiled = torch.compile(twin, fullgraph=True)  # raises on any graph break
    for seed in (1, 2):  # the second step reuses the workspace and draws anew
        want_out, want_grads = _train_step(fast, x, y, seed)
        got_out, got_grads = _train_step(compiled, x, y, seed)
        torch.testing.assert_close(got_out, want_out, rtol=1e-4, atol=1e-5)
        assert len(got_grads) == len(want_grads) > 0
        for got, want in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # sampled for real: some weight has input columns / channels with a zero gradient
    assert any((g.transpose(0, 1).flatten(1) == 0).all(1).any() for g in want_grads if g.dim() >= 2)


@pytest.mark.slow
def test_attention_matmuls_compile_without_breaks() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 16, 32)
    fast = approxcompile.optimize(
        Attention(32), 0.4, example_inputs=(x,), config=ApproxConfig(exclude_first_last=False)
    ).train()
    assert "sampled_matmul" in fast.code or "sampled_linear" in fast.code
    torch._dynamo.reset()
    assert torch._dynamo.explain(fast)(x).graph_break_count == 0
    torch.compile(fast, fullgraph=True)(x).sum().backward()


def _linear_args() -> tuple:
    x = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(5, 16, requires_grad=True)
    return x, w, torch.randn(5, requires_grad=True), torch.tensor([1, 4, 9]), torch.rand(3) + 0.5, True


def _conv_args() -> tuple:
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    w = torch.randn(4, 6, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    return x, w, b, torch.tensor([0, 2, 5]), None, True, [1, 1], [1, 1], [1, 1]


# Random ops can not compare two runs of themselves, so their outputs are not compared; the
# schema, the fake kernel and the autograd registration are checked for every op.
STRUCTURE = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize(
    ("op", "args", "tests"),
    [
        (ops.sampled_linear_product, _linear_args(), None),
        (ops.sampled_conv_product, _conv_args(), None),
        (draw, (torch.rand(12), torch.randn(3, 12), 4, "topk", 0.1, None, None, False), None),
        (draw, (torch.rand(12), torch.randn(3, 12), 4, "crs", 0.1, None, None, False), STRUCTURE),
        (
            ops.backward_sampled_linear_forward,
            (torch.randn(8, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True), None)
            + (0.5, 0.25, "uniform", 0.1, True, None),
            STRUCTURE,
        ),
        (
            ops.backward_sampled_conv_forward,
            (torch.randn(4, 3, 5, 5, requires_grad=True), torch.randn(2, 3, 3, 3, requires_grad=True), None)
            + ([1, 1], [0, 0], [1, 1], 0.5, 0.5, "crs", 0.1, False, None),
            STRUCTURE,
        ),
    ],
)
def test_custom_ops_pass_torch_opcheck(op: object, args: tuple, tests: tuple[str, ...] | None) -> None:
    kwargs = {} if tests is None else {"test_utils": tests}
    torch.library.opcheck(op, args, **kwargs)  # type: ignore[arg-type]


def test_flop_counter_sees_the_products_inside_the_custom_ops() -> None:
    x, w, b, index, scale, unique = _linear_args()
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        ops.sampled_linear_product(x, w, b, index, scale, unique)[0].sum().backward()
    assert counter.get_total_flops() == 3 * 2 * 6 * 3 * 5  # forward, dx and dW over k = 3 of 16


def _saved_dtypes(model: torch.nn.Module, x: torch.Tensor) -> list[torch.dtype]:
    """Dtypes of the tensors a ``torch.compile``d forward saves for backward (Inductor's own choice).

    The caches are off: a cached graph from other code would answer for this one.
    """
    torch._dynamo.reset()
    with (
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        out = torch.compile(model, fullgraph=True)(x)
    node = out.grad_fn
    while node is not None and "CompiledFunction" not in type(node).__name__:
        node = node.next_functions[0][0]
    assert node is not None
    saved = [t.dtype for t in node.saved_tensors]
    del out, node
    # Dynamo's cache keeps the model alive: drop it, so later tests see a free workspace.
    torch._dynamo.reset()
    return saved


@pytest.mark.slow
def test_compiled_relu_before_sampled_linear_saves_no_bool_mask() -> None:
    # The sampled linear saves its whole input when traced, so a ReLU before it keeps a float
    # tensor for backward; a saved bool mask costs Inductor a slow vectorised bool store.
    torch.manual_seed(0)
    x = torch.randn(16, 64)
    fast = _optimized(MLP(), x)
    assert fast.code.count("sampled_linear(") >= 2
    dtypes = _saved_dtypes(fast, x)
    assert dtypes and torch.bool not in dtypes, dtypes


@pytest.mark.parametrize("compute", [None, torch.bfloat16])
def test_backward_op_given_the_whole_input_too_gives_the_same_gradients(compute: torch.dtype | None) -> None:
    """A traced backward passes the whole input next to the slice (unread): the same gradients."""
    x, w, b, index, scale, unique = (t.detach() if isinstance(t, torch.Tensor) else t for t in _linear_args())
    y, xs = ops.sampled_linear_product(x, w, b, index, scale, unique, compute)
    dy = torch.randn_like(y)
    common = (w, index, scale, list(x.shape), x.shape[-1], unique, True, True, x.dtype, compute)
    want = ops.sampled_linear_product_backward(dy, xs, *common)
    args = (dy, xs, *common, x)
    torch.library.opcheck(ops.sampled_linear_product_backward, args)
    got = ops.sampled_linear_product_backward(*args)
    for g, e in zip(got, want, strict=True):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_relus_around_sampled_convs_save_no_bool_mask() -> None:
    # The benchmark CNN's shape: ReLU before a sampled conv, and ReLU + max pool behind one.
    # The sampled conv keeps its whole input and its output when traced, so every ReLU mask
    # is recomputed from a float tensor instead of stored as bool.
    from bench_models import CNN as PoolCNN

    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    fast = _optimized(PoolCNN(32), x)
    assert fast.code.count("sampled_conv(") >= 1
    dtypes = _saved_dtypes(fast, x)
    assert dtypes and torch.bool not in dtypes, dtypes
