"""Fast building blocks of the sampled ops: score norms and the sampled linear / conv products.

Where the time goes on a CPU (measured in docs/performance.md):

- reducing a weight over its rows with ``W.norm(dim=0)`` is a strided reduction that
  costs more than a dense GEMM's tenth; :func:`column_norms` reads rows in cache-sized
  chunks instead;
- plain autograd through ``index_select`` saves the full input, allocates full-size
  zero-filled gradients on fresh pages every step and computes gradients nobody asked
  for. The products here save only the sampled slices, compute only what
  ``ctx.needs_input_grad`` asks for, and build the full-size gradients in
  :data:`~approxcompile.ops.workspace.WORKSPACE` memory that is reused across steps.

The products are ``torch.library`` custom ops (``torch.ops.approxcompile.*``) with a fake
kernel and a registered autograd formula, so ``torch.compile`` keeps them in one graph
(AOTAutograd sees the backward op too) and Inductor compiles the code around them; their
kernels run the same eager code, workspace included, inside the compiled graph. Plain eager
calls (:func:`linear_product`, :func:`conv_product`) run the same kernels through a plain
``autograd.Function`` (:func:`_eager`) instead of the op and its generated autograd wrapper.

Both products compute exactly what autograd through ``index_select`` computes (the
tests compare them), for every method: sorted indices, a per-index scale or none, and
repeated indices (``crs``) accumulated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from approxcompile.ops import amp
from approxcompile.ops.eager import direct
from approxcompile.ops.live import LIVE_MAX, live_channels, live_columns
from approxcompile.ops.workspace import WORKSPACE

_ACC_ROWS = 256  # rows per accumulator block: 256 x 4096 fp32 is 4 MB, read once per chunk


def column_norms(t: Tensor) -> Tensor:
    """``|t[:, j]|`` for a 2-D ``t``, reading rows in cache-sized chunks (:func:`column_squares`)."""
    return column_squares(t).sqrt_()


def column_squares(t: Tensor) -> Tensor:
    """``|t[:, j]|^2`` for a 2-D ``t`` (as float32 or float64), reading rows in cache-sized chunks.

    Accumulates ``block * block`` of successive row blocks into one block-sized
    accumulator (``addcmul_``: contiguous, vectorised, no temporaries) and reduces it
    once, instead of a strided reduction over the whole matrix. Squares rank columns as
    norms do, so ``topk`` scores take them without a square root.
    """
    t = t.detach()
    if t.dtype != torch.float32 and t.dtype != torch.float64:
        t = t.float()
    rows = t.shape[0]
    if rows <= 2 * _ACC_ROWS:
        return t.square().sum(0)
    full = rows - rows % _ACC_ROWS
    blocks = t[:full].split(_ACC_ROWS)
    acc = blocks[0].square()
    for block in blocks[1:]:
        acc.addcmul_(block, block)
    out = acc.sum(0)
    if full < rows:
        out.add_(t[full:].square().sum(0))
    return out


_WEIGHT_NORMS = WeakIdKeyDictionary()  # weight -> {norms function: (weight version, value)}


def weight_norms(weight: Tensor, every: int, norms: Callable[[Tensor], Tensor]) -> Tensor:
    """``norms(weight)``, reused until ``weight`` has been updated ``every`` times in place.

    Why: the weight half of a sampled layer's scores is a pass over the whole weight every
    step, which on small layers costs about what sampling saves (``weight_norms_every`` of
    ``ApproxConfig``). Updates are counted by the tensor's version counter, which every
    in-place write bumps (an optimizer step, ``load_state_dict``; not a ``.data`` swap).
    Traced, fake and subclass tensors recompute on every call. The value returned may be
    the cached tensor itself: callers must not modify it.
    """
    if every <= 1 or not direct(weight):
        return norms(weight)
    version = weight._version
    cached = _WEIGHT_NORMS.get(weight)
    entry = None if cached is None else cached.get(norms)
    if entry is not None and version - entry[0] < every:
        return entry[1]
    value = norms(weight)
    if cached is None:
        cached = _WEIGHT_NORMS[weight] = {}
    cached[norms] = (version, value)
    return value


def channel_norms(weight: Tensor) -> Tensor:
    """``|W[:, c]|`` of a convolution weight, for :func:`weight_norms`."""
    return slice_norms(weight, 1)


def slice_norms(t: Tensor, dim: int) -> Tensor:
    """Euclidean norm of every slice of ``t`` along ``dim`` (reduces all other dims)."""
    if dim % t.dim() == t.dim() - 1:  # the inner dim is contiguous: reduce row chunks
        return column_norms(t.reshape(-1, t.shape[-1]))
    t = t.detach().float()
    if dim % t.dim() == 1 and t.is_contiguous():
        # Channels: reduce each contiguous (H*W...) run first, then the batch, which is
        # ~10x faster than one reduction over dims (0, 2, 3) on a CPU.
        per_sample = torch.linalg.vector_norm(t.reshape(t.shape[0], t.shape[1], -1), dim=2)
        return torch.linalg.vector_norm(per_sample, dim=0)
    dims = tuple(d for d in range(t.dim()) if d != dim % t.dim())
    return torch.linalg.vector_norm(t, dim=dims)


def autocast_compute(x: Tensor, weight: Tensor, bias: Tensor | None) -> torch.dtype | None:
    """The dtype a sampled linear product runs in under autocast, ``None`` when nothing changes.

    ``None`` too when an operand is float64: autocast leaves float64 alone, so those inputs
    take :func:`autocast_inputs`' whole-tensor route (the op then sees the dtypes autocast's
    own cast would give).
    """
    dtype = amp.autocast_dtype(x)
    operands = [t for t in (x, weight, bias) if t is not None]
    if dtype is None or any(t.dtype == torch.float64 or not t.is_floating_point() for t in operands):
        return None
    return None if all(t.dtype == dtype for t in operands) else dtype


def autocast_inputs(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """A product's inputs cast to the autocast dtype when autocast is on for ``x``'s device.

    Autocast's own rule for its lower-precision ops (linear, conv, matmul, addmm), from
    ``ops/amp.py``: floating tensors other than float64 are cast; the casts are
    differentiable, so the gradients come back in each input's own dtype. The custom ops
    then see one dtype (autocast passes custom ops through without casting).
    """
    dtype = amp.autocast_dtype(x)
    if dtype is None:
        return x, weight, bias
    cx, cw, cb = amp.cast(dtype, x, weight, bias)
    assert cx is not None and cw is not None
    return cx, cw, cb


def _scatter(cols: Tensor, dim: int, index: Tensor, full: Tensor, unique: bool) -> Tensor:
    """``full`` (zeroed here) with ``cols`` placed at ``index`` along ``dim``; repeats add up."""
    full.zero_()
    # index_add_ is also the faster kernel for unique indices on CPU (measured); index_copy_
    # is kept for devices where add needs atomics.
    if unique and full.device.type != "cpu":
        return full.index_copy_(dim, index, cols)
    return full.index_add_(dim, index, cols)


def _to(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def linear_forward_kernel(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    index: Tensor,
    scale: Tensor | None,
    unique: bool,
    compute: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """``y = (x[:, I] * s) @ W[:, I]^T + b`` -> ``(y, xs)``; the gathered input slice is kept for backward.

    The gathered weight columns are not kept: backward gathers them again, into the memory
    that then receives the weight gradient (:func:`sampled_linear_product_backward`). Here they
    go to a free weight-gradient buffer of the workspace when there is one (between
    ``zero_grad`` and ``backward`` there is), so the forward allocates no weight-sized memory.
    Its backward touches only the sample, computes only the gradients autograd asks for, and
    builds full-size gradients in reusable workspace memory. ``unique``: no index repeats.

    ``compute``: the dtype the product runs in (autocast's, see :func:`autocast_compute`) when
    it differs from the inputs'. Only the gathered slices are cast, ``(M, k)`` and ``(p, k)``,
    never the whole weight, and ``y`` and ``xs`` come out in it; the backward returns each
    gradient in its input's own dtype.
    """
    n, p = weight.shape[1], weight.shape[0]
    xs = _input_slice(x, index, scale, n, compute)
    ws = WORKSPACE.borrow("grad", (p, index.numel()), weight.dtype, weight.device)
    ws = torch.index_select(weight, 1, index, out=ws) if ws is not None else weight.index_select(1, index)
    ws = _to(ws, compute)
    y = torch.addmm(_to(bias, compute), xs, ws.t()) if bias is not None else xs @ ws.t()
    return y.view(*x.shape[:-1], p), xs


# The op is the kernel itself, as for the backward below; plain eager calls take
# :class:`_EagerLinearProduct` (:func:`linear_product`).
sampled_linear_product = torch.library.custom_op("approxcompile::sampled_linear_product", mutates_args=())(
    linear_forward_kernel
)


@sampled_linear_product.register_fake
def _linear_fake(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    index: Tensor,
    scale: Tensor | None,
    unique: bool,
    compute: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    n, p, k = weight.shape[1], weight.shape[0], index.shape[0]
    dtype = compute or x.dtype
    return x.new_empty((*x.shape[:-1], p), dtype=dtype), x.new_empty((x.numel() // n, k), dtype=dtype)


def _input_slice(
    x: Tensor, index: Tensor, scale: Tensor | None, n: int, compute: torch.dtype | None
) -> Tensor:
    """``xs`` of :func:`sampled_linear_product`: ``x``'s columns ``index``, scaled, in ``compute``."""
    xs = _to(x.reshape(-1, n).index_select(1, index), compute)
    return xs if scale is None else xs.mul_(scale.to(xs.dtype))


LIVE_MIN_PRODUCT = 128  # kept columns times products computed, below which dy is not tested
# Multiply-adds of the products (rows x outputs x kept columns x products) below which dy is
# not tested either: the test and the live path's row scatter cost about 100 us of fixed work
# (1 thread), more than they save on the MNIST MLP's layers (batch 50, 500 wide: 8-12 M
# multiply-adds; its sampled step measured 4.5% faster without the test).
LIVE_MIN_MACS = 1 << 24


def linear_backward_kernel(
    dy: Tensor,
    xs: Tensor,
    weight: Tensor,
    index: Tensor,
    scale: Tensor | None,
    x_shape: Sequence[int],
    n: int,
    unique: bool,
    need_x: bool,
    need_w: bool,
    x_dtype: torch.dtype | None = None,
    compute: torch.dtype | None = None,
    x: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(dx, dW)`` of :func:`sampled_linear_product`; an empty tensor for one not needed.

    ``dx`` comes in ``x_dtype`` (default: ``xs``'s), ``dW`` in the weight's dtype: under
    autocast the products run in ``xs``'s (lower) dtype on the gathered slices only, and the
    ``dW`` columns are widened into the full-precision workspace gradient.

    One weight-sized workspace buffer serves twice: its tail first holds the gathered weight
    columns for ``dx``, then the ``dW`` product, which is spread out in place
    (:func:`_weight_grad_in_place`). So a sampled layer's backward needs no memory beyond
    the gradients exact training allocates (a kept ``(p, k)`` copy of the columns would be
    23 MB per 4096 x 4096 weight at keep 0.35, alive from forward to backward). Two
    exceptions, both workspace: products of at most ``SMALL_PRODUCT`` elements use a
    ``(p, k)`` buffer, and the live-columns path below a ``(live, n)`` block.

    Output columns whose gradient is zero in every row are left out of both products (their
    ``dW`` rows are zero, they add nothing to ``dx``): behind a forward-sampled linear and an
    elementwise activation only the columns that linear kept get a gradient
    (:func:`~approxcompile.ops.live.live_columns`).

    ``x``: the whole input, unused here; a traced backward passes it next to ``xs`` so that
    the compiled graph keeps it (:func:`_linear_setup` says why).
    """
    p = weight.shape[0]
    k = index.numel()
    dy2 = _to(dy.reshape(-1, p), xs.dtype)
    # The full live test reads dy twice (amax, amin): about what one product with k = 32
    # costs (1 thread, 2048 x 1536), so it is skipped where the products are too thin to pay
    # for it (byte_gpt's fc1 keeps 16 of 384 input columns), or too small in all (MNIST MLP).
    products = need_x + need_w
    test = k * products >= LIVE_MIN_PRODUCT and dy2.shape[0] * p * k * products >= LIVE_MIN_MACS
    live = live_columns(dy2) if test else None
    dx, dw = dy.new_empty(0), dy.new_empty(0)  # two tensors: a custom op's outputs may not alias
    full = WORKSPACE.get("grad", (p, n), weight.dtype, dy.device)
    dy_live = dy2 if live is None else dy2.index_select(1, live)
    if need_x:
        ws = full.view(-1)[p * n - p * k :].view(p, k)
        torch.index_select(weight, 1, index, out=ws)
        if live is not None:  # a small (live, k) copy: the rows that meet a nonzero gradient
            ws = ws.index_select(0, live)
        dxs = dy_live @ _to(ws, xs.dtype)
        if scale is not None:
            dxs.mul_(scale.to(dxs.dtype))
        dxs = _to(dxs, x_dtype)
        dx = _scatter(dxs, 1, index, WORKSPACE.get("dx", (dy2.shape[0], n), dxs.dtype, dy.device), unique)
        dx = dx.view(x_shape)
    if need_w and live is None:
        dw = _weight_grad_in_place(dy2, xs, index, full, unique)
    elif need_w:  # the (live, k) product into the rows and columns it belongs to, zeros elsewhere
        assert live is not None
        # Columns spread in a (live, n) workspace block, then whole rows moved into place: a
        # 2-D index_put_ took 6.9 ms for product and spread, this 4.0 (1024 x 3136, 700
        # live, k 1880, 1 thread). The block replaces the (live, k) product buffer.
        rows = WORKSPACE.get("dwl", (live.numel(), n), full.dtype, full.device)
        dw = _scatter(_weight_grad_in_place(dy_live, xs, index, rows, unique), 0, live, full, True)
    return dx, dw


# (p, k) products up to this many elements (4 MB in fp32) go through a buffer of their own:
# a few blocks each cost a scatter call, which at MLP sizes outweighs the copy they save.
SMALL_PRODUCT = 1 << 20


def _weight_grad_in_place(dy2: Tensor, xs: Tensor, index: Tensor, full: Tensor, unique: bool) -> Tensor:
    """``full`` (p, n) set to ``dy2ᵀ·xs`` (p, k) scattered to columns ``index``, with no (p, k) buffer.

    Why: a separate (p, k) product buffer is a second weight-sized allocation next to the
    gradient (23 MB for a 4096 x 4096 weight at keep 0.35), held across steps. Here the
    product is computed (one GEMM, as fast as before) into the *end* of the gradient's own
    storage and then spread out in large blocks of rows from the front: rows ``[r0, r1)``
    land in ``[r0·n, r1·n)``, which lies before every product row not yet moved (they start
    at ``p·n - p·k + r0·k``) as long as ``r1·n`` does not pass that. Each block takes that
    largest ``r1``, so the rows left shrink by ``k/n`` per block; once at most ``p/8`` are
    left (after 2 blocks at keep 0.35, 10 at 0.8) they move from a copy in the workspace.
    Few blocks because each is a parallel region, which costs on a busy machine.

    Under autocast (``xs`` in a lower dtype than ``full``) the product is computed in ``xs``'s
    dtype into a ``(p, k)`` workspace buffer of that dtype and widened into the tail. Products
    of at most ``SMALL_PRODUCT`` elements skip the blocks: one scatter from a ``(p, k)``
    workspace buffer (at such sizes each block's call costs more than the buffer).
    """
    p, n = full.shape
    k = index.numel()
    if p * k <= SMALL_PRODUCT and xs.dtype == full.dtype:  # one scatter from a small buffer
        product = torch.mm(dy2.t(), xs, out=WORKSPACE.get("dws", (p, k), xs.dtype, xs.device))
        return _scatter(product, 1, index, full, unique)
    base = p * n - p * k
    product = full.view(-1)[base:].view(p, k)
    if xs.dtype == full.dtype:
        torch.mm(dy2.t(), xs, out=product)
    else:
        product.copy_(torch.mm(dy2.t(), xs, out=WORKSPACE.get("dwc", (p, k), xs.dtype, xs.device)))
    r0 = 0
    while 8 * (p - r0) > p:
        r1 = min((base + r0 * k) // n, p)
        if r1 <= r0:  # k == n: nothing can move in place
            break
        _scatter(product[r0:r1], 1, index, full[r0:r1], unique)
        r0 = r1
    if r0 < p:  # the destinations reach the rows still to move: move those from a copy
        rest = WORKSPACE.get("dws", (p - r0, k), product.dtype, product.device)
        _scatter(rest.copy_(product[r0:]), 1, index, full[r0:], unique)
    return full


# The op is the kernel itself: compiled graphs, fake tensors and flop counters see one opaque
# op; plain eager backwards take ``linear_backward_kernel`` directly (:func:`_linear_backward`).
sampled_linear_product_backward = torch.library.custom_op(
    "approxcompile::sampled_linear_product_backward", mutates_args=()
)(linear_backward_kernel)


@sampled_linear_product_backward.register_fake
def _linear_backward_fake(
    dy: Tensor,
    xs: Tensor,
    weight: Tensor,
    index: Tensor,
    scale: Tensor | None,
    x_shape: Sequence[int],
    n: int,
    unique: bool,
    need_x: bool,
    need_w: bool,
    x_dtype: torch.dtype | None = None,
    compute: torch.dtype | None = None,
    x: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    dx = dy.new_empty(x_shape, dtype=x_dtype or xs.dtype) if need_x else dy.new_empty(0)
    return dx, dy.new_empty((weight.shape[0], n), dtype=weight.dtype) if need_w else dy.new_empty(0)


def _linear_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    x, weight, bias, index, scale, unique, compute = inputs
    _, xs = output
    ctx.mark_non_differentiable(xs)
    # Else autograd zero-fills an (m, k) gradient for xs before every backward, unread.
    ctx.set_materialize_grads(False)
    # Traced (torch.compile): the whole input goes to the backward op too, next to xs, unread.
    # With xs alone saved, a ReLU before the op has no float tensor left for its backward, so
    # the partitioner saves the ReLU's bool mask, and Inductor's vectorised bool store is slow
    # on some CPUs (ReLU + mask of 256 x 4096: 12 ms against 0.6 ms for eager ReLU, 1 thread,
    # AMD EPYC; docs/performance.md). With x saved the mask is recomputed from it in backward.
    # xs is kept as well (an (m, k) op output) rather than gathered again from x in backward.
    # Eager autograd saves a ReLU's output itself: there the small xs alone is the better choice.
    traced = not direct(x, weight)
    ctx.save_for_backward(xs, weight, index, scale, x if traced else None)
    ctx.x_shape, ctx.n, ctx.unique, ctx.has_bias = x.shape, weight.shape[1], unique, bias is not None
    ctx.x_dtype, ctx.b_dtype, ctx.compute = x.dtype, None if bias is None else bias.dtype, compute


def _linear_backward(ctx: Any, dy: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
    amp.refuse_double_backward("sampled_linear")
    xs, weight, index, scale, x = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    op = (
        linear_backward_kernel
        if direct(dy, xs, weight, index, scale)
        else torch.ops.approxcompile.sampled_linear_product_backward
    )
    dx, dw = op(
        dy, xs, weight, index, scale, ctx.x_shape, ctx.n, ctx.unique, need_x, need_w, ctx.x_dtype,
        ctx.compute, x,
    )  # fmt: skip
    db = dy.reshape(-1, dy.shape[-1]).sum(0, dtype=ctx.b_dtype) if ctx.has_bias and need_b else None
    return dx if need_x else None, dw if need_w else None, db, None, None, None, None


sampled_linear_product.register_autograd(_linear_backward, setup_context=_linear_setup)


def conv_args(stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> tuple[Any, ...]:
    """``aten.convolution``'s arguments after the bias, for a plain convolution (groups = 1)."""
    return (stride, padding, dilation, False, [0] * len(stride), 1)


def plain_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """``aten.convolution`` of a plain convolution (groups = 1): the exact op of every conv kernel here."""
    return torch.ops.aten.convolution(x, weight, bias, *conv_args(stride, padding, dilation))


# flexible_layout: Inductor hands the conv ops its own layout (channels-last around its convs)
# instead of converting every activation to the layout eager tracing saw; the ops follow it.
def conv_forward_kernel(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    index: Tensor,
    scale: Tensor | None,
    unique: bool,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[Tensor, Tensor, Tensor]:
    """``conv(x[:, I], W[:, I] * s, b)`` over input channels ``I`` (groups = 1) -> ``(y, xs, ws)``.

    The scale rides on the (small) weight slice. Backward calls
    ``aten.convolution_backward`` with an output mask from ``ctx.needs_input_grad`` and
    scatters the channel gradients into reusable workspace memory.

    A channels-last ``x`` gives a channels-last ``xs`` and ``y`` (as ``F.conv2d`` does) and
    ``dx``: the gather then reads contiguous runs, and oneDNN runs channels-last
    convolutions without padding the kept channels to whole 16-channel blocks.
    """
    xs = _gather_channels(x, index)
    ws = weight.index_select(1, index)
    if scale is not None:
        ws.mul_(scale.to(ws.dtype).view(1, -1, *([1] * (ws.dim() - 2))))
    y = plain_conv(xs, ws, bias, stride, padding, dilation)
    return y, xs, ws


sampled_conv_product = torch.library.custom_op(
    "approxcompile::sampled_conv_product", mutates_args=(), tags=(torch.Tag.flexible_layout,)
)(conv_forward_kernel)


@sampled_conv_product.register_fake
def _conv_fake(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    index: Tensor,
    scale: Tensor | None,
    unique: bool,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[Tensor, Tensor, Tensor]:
    xs, ws = _gather_channels(x, index), weight.index_select(1, index)
    y = plain_conv(xs, ws, bias, stride, padding, dilation)
    return y, xs, ws


def _channels_last(t: Tensor) -> bool:
    """Strictly channels-last (a tensor that is both, e.g. one channel, counts as contiguous)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def select(t: Tensor, dim: int, index: Tensor) -> Tensor:
    """``t.index_select(dim, index)``; the last dim of a contiguous N-D tensor goes through a 2-D view.

    On a CPU, ``index_select`` along the last dim of a 4-D tensor is 3-4x slower than the
    same selection on its ``(rows, n)`` view, forward and backward (measured on attention
    probabilities, (16, 6, 128, 128) -> 48 keys: 7.6 against 2.0 ms), and that gather is
    what the sampled ``P @ V`` of an attention block spends most of its time on.
    """
    n = t.shape[dim]
    if t.dim() <= 2 or dim % t.dim() != t.dim() - 1 or not t.is_contiguous():
        return t.index_select(dim, index)
    return t.reshape(-1, n).index_select(1, index).view(*t.shape[:-1], index.numel())


def _gather_channels(x: Tensor, index: Tensor) -> Tensor:
    """``x[:, index]``, channels-last when ``x`` is (a gather along its innermost dimension).

    The channels-last gather runs on the 2-D ``(N*H*W, C)`` view: ``index_select`` along the
    last dim of the 4-D view took 30 ms for 32x128x32x32 -> 51 channels, the 2-D one 2.5 ms
    (1 thread; under ``torch.compile`` Inductor hands the op channels-last activations).
    """
    if _channels_last(x):  # the (n, h, w, c) permutation is a contiguous view of its memory
        return select(x.permute(0, 2, 3, 1), 3, index).permute(0, 3, 1, 2)
    return x.index_select(1, index)


def _conv_grads(
    dy: Tensor, xs: Tensor, ws: Tensor, conv: tuple[Any, ...], need_x: bool, need_w: bool, need_b: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``aten.convolution_backward`` of ``conv(xs, ws)`` in the layout of the larger of ``dy``, ``xs``.

    Layouts differ under ``torch.compile``, where Inductor hands the op a channels-last ``xs``
    and an NCHW ``dy`` (its pointwise kernels write NCHW): copying a 32x128x32x32 ``dy`` to
    channels-last took 19 ms (1 thread), its 16-channel ``xs`` to NCHW 0.5 ms, and the NCHW
    backward no longer than the channels-last one. The weight slice follows, else oneDNN
    converts to channels-last itself.
    """
    if dy.shape[1] == 0:  # no live output channel: every gradient is zero
        return torch.zeros_like(xs), torch.zeros_like(ws), dy.new_zeros(0)
    layout = _memory_format(xs if xs.numel() >= dy.numel() else dy)
    return torch.ops.aten.convolution_backward(
        dy.contiguous(memory_format=layout),
        xs.contiguous(memory_format=layout),
        ws.contiguous(memory_format=layout),
        [dy.shape[1]] if need_b else None,
        *conv,
        [need_x, need_w, need_b],
    )


def _live_conv_grads(
    dy: Tensor, xs: Tensor, ws: Tensor, conv: tuple[Any, ...], need_x: bool, need_w: bool, need_b: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_conv_grads` over the output channels of ``dy`` that are not all zero; zeros in the rest.

    The same gradients: a dead channel's ``dW`` rows and bias entry are zero and it adds
    nothing to ``dx`` (:func:`~approxcompile.ops.live.live_channels`).
    """
    live = live_channels(dy)
    if live is None:
        return _conv_grads(dy, xs, ws, conv, need_x, need_w, need_b)
    dxs, dws_live, db_live = _conv_grads(
        _gather_channels(dy, live), xs, ws.index_select(0, live), conv, need_x, need_w, need_b
    )
    dws = ws.new_zeros(ws.shape).index_copy_(0, live, dws_live) if need_w else dws_live
    db = dy.new_zeros(dy.shape[1]).index_copy_(0, live, db_live) if need_b else db_live
    return dxs, dws, db


def conv_backward_kernel(
    dy: Tensor,
    xs: Tensor,
    ws: Tensor,
    index: Tensor,
    scale: Tensor | None,
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    unique: bool,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    need_x: bool,
    need_w: bool,
    need_b: bool,
    y: Tensor | None = None,
    x: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dW, db)`` of :func:`sampled_conv_product`; an empty tensor for one not needed.

    Output channels whose gradient is zero everywhere are left out of the products (their
    ``dW`` rows and ``db`` entries are zero, and they add nothing to ``dx``): when the next
    layer is a sampled convolution behind channel-wise ops (ReLU, pooling), only the
    channels it kept get a gradient, so this backward shrinks by that keep ratio too.

    ``y``, ``x``: the forward's output and whole input, unused here; a traced backward passes
    them so that the compiled graph keeps them (:func:`_conv_setup`).
    """
    conv = conv_args(stride, padding, dilation)
    dxs, dws, db = _live_conv_grads(dy, xs, ws, conv, need_x, need_w, need_b)
    dx, dw = dy.new_empty(0), dy.new_empty(0)  # two tensors: a custom op's outputs may not alias
    if need_x and _channels_last(xs):  # dx channels-last too: scatter along the innermost dim
        n, c, h, w = x_shape
        full = WORKSPACE.get("dx", (n, h, w, c), dxs.dtype, dy.device)
        dx = _scatter(dxs.permute(0, 2, 3, 1), 3, index, full, unique).permute(0, 3, 1, 2)
    elif need_x:
        dx = _scatter(dxs, 1, index, WORKSPACE.get("dx", x_shape, dxs.dtype, dy.device), unique)
    if need_w:
        if scale is not None:
            dws.mul_(scale.to(dws.dtype).view(1, -1, *([1] * (dws.dim() - 2))))
        dw = _scatter(dws, 1, index, WORKSPACE.get("grad", w_shape, dws.dtype, dy.device), unique)
    return dx, dw, db if need_b else dy.new_empty(0)


sampled_conv_product_backward = torch.library.custom_op(
    "approxcompile::sampled_conv_product_backward", mutates_args=(), tags=(torch.Tag.flexible_layout,)
)(conv_backward_kernel)


@sampled_conv_product_backward.register_fake
def _conv_backward_fake(
    dy: Tensor,
    xs: Tensor,
    ws: Tensor,
    index: Tensor,
    scale: Tensor | None,
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    unique: bool,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    need_x: bool,
    need_w: bool,
    need_b: bool,
    y: Tensor | None = None,
    x: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    dx = dy.new_empty(0)
    if need_x and _channels_last(xs):
        dx = dy.new_empty(x_shape).contiguous(memory_format=torch.channels_last)
    elif need_x:
        dx = dy.new_empty(x_shape)
    dw = dy.new_empty(w_shape) if need_w else dy.new_empty(0)
    return dx, dw, dy.new_empty((dy.shape[1],)) if need_b else dy.new_empty(0)


def _conv_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    x, weight, bias, index, scale, unique, stride, padding, dilation = inputs
    _, xs, ws = output
    ctx.mark_non_differentiable(xs, ws)
    # The gradients of xs and ws are never used: without this autograd would allocate and
    # zero-fill an xs-sized tensor for them every backward (measured: ~1 ms a step on the CNN).
    ctx.set_materialize_grads(False)
    # Traced: the whole input too, as the sampled linear's (:func:`_linear_setup`), and the
    # output y, though the backward reads neither. With y kept, the partitioner recomputes the
    # mask of a ReLU behind the conv from it instead of saving that mask as bool, which costs
    # Inductor a slow store on some CPUs: ReLU + mask + 2x2 max pool on 32x128x32x32 took
    # 44 ms in the compiled CNN step, 2.5 ms without the mask (docs/performance.md). The price
    # is memory: y (16 MB there) instead of a bool mask a quarter its size.
    traced = not direct(x, weight)
    ctx.save_for_backward(xs, ws, index, scale, output[0] if traced else None, x if traced else None)
    ctx.conv = (stride, padding, dilation)
    ctx.shapes, ctx.unique, ctx.has_bias = (x.shape, weight.shape), unique, bias is not None


def _conv_backward(ctx: Any, dy: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
    amp.refuse_double_backward("sampled_conv")
    if dy is None:  # y took no part in the loss (grads are not materialised)
        return (None,) * 9
    xs, ws, index, scale, y, x = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = ctx.has_bias and ctx.needs_input_grad[2]
    op: Callable[..., tuple[Tensor, Tensor, Tensor]] = (
        conv_backward_kernel
        if direct(dy, xs, ws, index, scale)
        else torch.ops.approxcompile.sampled_conv_product_backward
    )
    dx, dw, db = op(
        dy, xs, ws, index, scale, *ctx.shapes, ctx.unique, *ctx.conv, need_x, need_w, need_b, y, x
    )
    grads = (dx if need_x else None, dw if need_w else None, db if need_b else None)
    return (*grads, None, None, None, None, None, None)


sampled_conv_product.register_autograd(_conv_backward, setup_context=_conv_setup)


def _memory_format(t: Tensor) -> torch.memory_format:
    return torch.channels_last if _channels_last(t) else torch.contiguous_format


def _eager(
    name: str, kernel: Callable[..., Any], setup: Callable[..., None], backward: Callable[..., Any]
) -> Any:
    """A plain ``autograd.Function`` running an op's kernel, setup and backward (eager calls only).

    Why: the custom op's generated autograd wrapper costs Python time on every call, and so
    does a ``setup_context`` Function, whose ``apply`` binds the forward's signature with
    ``inspect`` each time; this one sets its context up inside ``forward``. Measured on the
    development CPU (1 thread): a sampled linear's forward and backward at tiny sizes went
    from 370 to 280 us.
    """

    def forward(ctx: Any, *inputs: Any) -> Any:
        out = kernel(*inputs)
        setup(ctx, inputs, out)
        return out

    methods = {"forward": staticmethod(forward), "backward": staticmethod(backward)}
    return type(name, (torch.autograd.Function,), methods)


_EAGER_LINEAR = _eager("_EagerLinearProduct", linear_forward_kernel, _linear_setup, _linear_backward)
_EAGER_CONV = _eager("_EagerConvProduct", conv_forward_kernel, _conv_setup, _conv_backward)


def plain_call(*tensors: Tensor | None) -> bool:
    """A plain eager call with autocast off: the kernels may run without the op around them.

    Autocast is left to the op: it does not cast a custom op's inputs, but it would cast
    the operations inside an ``autograd.Function``'s forward.
    """
    first = tensors[0]
    return first is not None and amp.autocast_dtype(first) is None and direct(*tensors)


def linear_product(plain: bool, *args: Any) -> tuple[Tensor, Tensor]:
    """:func:`sampled_linear_product` (the arguments after ``plain``), or its kernel when ``plain``.

    ``plain``: :func:`plain_call` accepted the call (the caller checks once, for the draw too).
    """
    op = _EAGER_LINEAR.apply if plain else sampled_linear_product
    out: tuple[Tensor, Tensor] = op(*args)
    return out


def conv_product(plain: bool, *args: Any) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`sampled_conv_product` (the arguments after ``plain``), or its kernel when ``plain``."""
    op = _EAGER_CONV.apply if plain else sampled_conv_product
    out: tuple[Tensor, Tensor, Tensor] = op(*args)
    return out


class _LiveConv(torch.autograd.Function):
    """An exact convolution whose backward leaves out output channels with a zero gradient.

    Why: in front of a sampled convolution (through ReLU and pooling, which act channel by
    channel) only the channels that convolution kept get a gradient, so the exact layer
    before it can run its backward over those alone, as a sampled one does
    (:func:`_live_conv_grads`): the same gradients, up to the order of float sums. A
    dense gradient costs a read of one sample to find out. ``create_graph=True`` takes the
    plain differentiable backward.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, *conv: Sequence[int]) -> Tensor:
        """``conv``: stride, padding, dilation."""
        ctx.save_for_backward(x, weight)
        ctx.conv = conv_args(*conv)
        ctx.has_bias = bias is not None
        return plain_conv(x, weight, bias, *conv)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        grads = _conv_grads if torch.is_grad_enabled() else _live_conv_grads  # double backward: plain
        dx, dw, db = grads(dy, x, weight, ctx.conv, need_x, need_w, need_b)
        return dx if need_x else None, dw if need_w else None, db if need_b else None, None, None, None


# The compiled live backward pays when the products it leaves out cost this many multiply-adds
# per element of dy: it reads dy twice (the channel maxima, then the gather of the live
# channels), and Inductor's loops over a channels-last dy are slow. Measured on the CNN
# benchmark (1 thread): its 128 -> 128 conv in front of a conv keeping 96 (576 saved per
# element) went from 48 to 36 ms with about 2 ms of test and gather; its 3 -> 128 first conv
# in front of one keeping 16 (24 per element) saved 6 ms and spent 9.
LIVE_MIN_MACS_PER_ELEMENT = 64


class _TracedLiveConv(torch.autograd.Function):
    """Under ``torch.compile``: an exact convolution whose backward runs over ``live`` output channels.

    Why: :class:`_LiveConv` finds the live channels by value, a size Dynamo cannot trace, and an
    opaque custom op around the exact conv measured slower (Inductor lost its own conv lowering
    and layouts: compiled CNN step 263 against 226 ms). Here Dynamo traces forward and backward
    as aten ops at static shapes: the backward keeps the ``live`` channels with the largest
    ``max |dy|``, runs ``convolution_backward`` over those and puts the ``dW`` rows and ``db``
    entries back among zeros. ``live`` comes from the rewrite (``passes.rewrite.live_bound``):
    at most that many channels have a nonzero gradient, so the ``live`` largest include all of
    them and the gradients are exact (a NaN ranks highest in ``topk``, so it stays in).
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, stride: Sequence[int],
        padding: Sequence[int], dilation: Sequence[int], live: int,
    ) -> Tensor:  # fmt: skip
        ctx.save_for_backward(x, weight)
        ctx.conv, ctx.has_bias, ctx.live = conv_args(stride, padding, dilation), bias is not None, live
        return plain_conv(x, weight, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        peak = dy.detach().abs().amax(dim=tuple(range(2, dy.dim()))).amax(0)
        live = peak.topk(ctx.live, sorted=False).indices.sort().values  # in order: gathers read forward
        dx, dw_live, db_live = torch.ops.aten.convolution_backward(
            dy.index_select(1, live),
            x,
            weight.index_select(0, live),
            [ctx.live] if need_b else None,
            *ctx.conv,
            [need_x, need_w, need_b],
        )
        dw = weight.new_zeros(weight.shape).index_copy(0, live, dw_live) if need_w else None
        db = dy.new_zeros(dy.shape[1]).index_copy(0, live, db_live) if need_b else None
        return dx if need_x else None, dw, db, None, None, None, None


def _traced_live_pays(x: Tensor, weight: Tensor, live: int) -> bool:
    """Whether :class:`_TracedLiveConv` saves more than it costs (:data:`LIVE_MIN_MACS_PER_ELEMENT`)."""
    c = weight.shape[0]
    if live > LIVE_MAX * c:
        return False
    products = int(x.requires_grad) + int(weight.requires_grad)
    macs = weight[0].numel() * products  # per element of dy, for each product left out
    return (c - live) / c * macs >= LIVE_MIN_MACS_PER_ELEMENT


def live_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    live: int | None = None,
) -> Tensor:
    """``conv(x, weight, bias)`` (groups = 1), exact; its backward skips dead output channels.

    Plain eager calls that autograd records take :class:`_LiveConv`; compiled ones with a
    ``live`` bound (at most that many output channels get a nonzero gradient) take
    :class:`_TracedLiveConv` where it pays; everything else (no gradient, autocast, fake
    tensors, export) the plain convolution.
    """
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if grad and plain_call(x, weight, bias):
        out: Tensor = _LiveConv.apply(x, weight, bias, stride, padding, dilation)
        return out
    if (
        grad
        and live is not None
        and torch.compiler.is_compiling()
        and amp.autocast_dtype(x) is None
        and _traced_live_pays(x, weight, live)
    ):
        traced: Tensor = _TracedLiveConv.apply(x, weight, bias, stride, padding, dilation, live)
        return traced
    return plain_conv(x, weight, bias, stride, padding, dilation)
