"""Typed facts the passes attach to nodes, under ``node.meta["approxcompile"]``.

Each pass returns a new :class:`NodePlan` with ``dataclasses.replace``; no pass sets
ad-hoc attributes on nodes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from approxcompile.choices import Method, Mode, OpType, Scores

if TYPE_CHECKING:
    from approxcompile.site import Site

META_KEY = "approxcompile"


def kept_count(keep: float, n: int) -> int:
    """Columns / channels kept out of ``n`` at ratio ``keep``; at least 1, at most ``n``."""
    return min(n, max(1, round(keep * n)))


def aligned_count(keep: float, n: int, align: int) -> int:
    """``kept_count`` rounded to a multiple of ``align`` when ``n`` is large enough for it.

    GEMM and convolution kernels run whole vector widths / blocked channel layouts, so a
    multiple of 8 columns or channels costs no more time than a few fewer (measured in
    docs/performance.md); inner dimensions under ``8 * align`` are not rounded.
    """
    k = kept_count(keep, n)
    if align <= 1 or n < 8 * align:
        return k
    return min(n, max(align, align * round(k / align)))


def conv_align(align: int, device_type: str) -> int:
    """The kept-channel multiple for a convolution: ``align``, raised to oneDNN's channel block on a CPU.

    oneDNN runs CPU convolutions of contiguous (NCHW) tensors in blocked channel layouts,
    16 channels a block with AVX-512 (8 below it), and pads the channels up to a whole
    block: a 3x3 convolution over 24 kept channels trains as slowly as one over 32, 40 as
    48, 51 or 56 as 64 (docs/performance.md). ``align <= 1`` (rounding off) stays off.
    """
    if align <= 1 or device_type != "cpu":
        return align
    import torch  # here, not at the top: the rest of plan.py is plain data

    block = 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8
    return math.lcm(align, block)


@dataclass(frozen=True)
class Flops:
    """Dense FLOPs of one product (2·M·N·K convention) in a training step."""

    forward: int
    input_grad: int
    weight_grad: int

    @property
    def total(self) -> int:
        return self.forward + self.input_grad + self.weight_grad

    def scaled(self, k: int, n: int) -> Flops:
        """The same products with the inner dimension cut from ``n`` to ``k``."""
        return Flops(self.forward * k // n, self.input_grad * k // n, self.weight_grad * k // n)

    def scaled_backward(self, k_out: int, p: int, k_rows: int, rows: int) -> Flops:
        """Backward sampling: forward exact, dX over ``k_out`` of ``p`` features, dW over ``k_rows`` rows."""
        return Flops(self.forward, self.input_grad * k_out // p, self.weight_grad * k_rows // rows)


@dataclass(frozen=True, kw_only=True)
class NodePlan:
    """One matmul / linear / conv node: what it is, what it costs, what was decided.

    ``keep == 1.0`` (``k == inner``) means the node runs exactly; ``reason`` then says why.
    """

    name: str
    kind: OpType
    op: str  # what the user wrote: "Linear", "F.linear", "matmul", "Conv2d", ...
    shapes: tuple[tuple[int, ...], ...]  # operand shapes (input first)
    out_shape: tuple[int, ...]
    inner: int  # the dimension sampling shrinks (features, contracted dim, channels)
    flops: Flops  # dense training-step FLOPs
    overhead_fixed: int = 0  # sampling overhead FLOPs independent of k (norms, selection)
    overhead_per_kept: int = 0  # sampling overhead FLOPs per kept column (gathers, scatters)
    sensitivity: tuple[tuple[float, float], ...] = ()  # (keep, relative squared error)
    timing: tuple[tuple[float, float], ...] = ()  # (keep, seconds); keep 1.0 is the dense op
    method: Method = "topk"
    min_k: int = 1
    fixed_keep: float | None = None  # set by an override: the allocation leaves it alone
    keep: float = 1.0
    k: int = 0
    est_error: float = 0.0
    reason: str | None = None  # why the node stays exact
    settings_source: str = "global"
    # "backward": forward exact; ``inner`` is then the output features p (dX's inner
    # dimension) and ``rows`` the batch rows M (dW's). ``keep`` is dX's ratio; ``row_keep``
    # dW's, chosen on its own from ``row_sensitivity`` (dW's error curve; ``sensitivity`` is
    # then dX's) and ``row_overhead_*``. ``row_keep=None``: dW shares ``keep`` (matmul and
    # attention, whose ops take one ratio, and plans saved before the split).
    mode: Mode = "forward"
    rows: int = 0
    row_keep: float | None = None
    row_fixed_keep: float | None = None  # an override's pinned dW ratio
    row_sensitivity: tuple[tuple[float, float], ...] = ()
    row_overhead_fixed: int = 0
    row_overhead_per_kept: int = 0
    # How the node multiplies, as the cost pass matched it; later passes read it instead of
    # matching again. It refers to graph nodes, so rewrite drops it once the graph changed.
    site: Site | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.k == 0:
            object.__setattr__(self, "k", self.inner)

    @property
    def split(self) -> bool:
        """Backward mode with separate dX (``keep``) and dW (``row_keep``) ratios."""
        return self.mode == "backward" and self.row_keep is not None

    @property
    def row_k(self) -> int:
        """Batch rows dW keeps (backward mode), as planned."""
        if self.row_keep is None:
            return kept_count(self.k / self.inner, self.rows) if self.inner else self.rows
        return kept_count(self.row_keep, self.rows)

    @property
    def sampled(self) -> bool:
        return self.k < self.inner or (self.split and self.row_k < self.rows)

    def cost(self, k: int | None = None, row_k: int | None = None) -> int:
        """Training FLOPs with ``k`` kept (default: as planned), overhead included.

        Split backward plans: ``row_k`` dW rows (default: as planned, or ``k``'s ratio when
        only ``k`` is given); each product is charged at its own count.
        """
        if self.split:
            if row_k is None:
                row_k = self.row_k if k is None else kept_count(k / self.inner, self.rows)
            k = self.k if k is None else k
            return self.flops.forward + self.grad_cost("dx", k) + self.grad_cost("dw", row_k)
        k = self.k if k is None else k
        if k >= self.inner:
            return self.flops.total
        return self._scaled(k).total + self.overhead_fixed + self.overhead_per_kept * k

    def grad_cost(self, product: str, kept: int) -> int:
        """Split backward plans: FLOPs of ``dx`` (``kept`` outputs) or ``dw`` (``kept`` rows) + overhead."""
        if product == "dx":
            dense, n = self.flops.input_grad, self.inner
            fixed, per = self.overhead_fixed, self.overhead_per_kept
        else:
            dense, n = self.flops.weight_grad, self.rows
            fixed, per = self.row_overhead_fixed, self.row_overhead_per_kept
        if kept >= n or dense == 0:  # a gradient autograd does not ask for is not computed
            return dense
        return dense * kept // n + fixed + per * kept

    def _scaled(self, k: int) -> Flops:
        if self.mode == "backward":
            return self.flops.scaled_backward(k, self.inner, kept_count(k / self.inner, self.rows), self.rows)
        return self.flops.scaled(k, self.inner)

    @property
    def approx_flops(self) -> Flops:
        """The products' FLOPs as planned (what FlopCounterMode sees; no overhead)."""
        if self.split:
            return self.flops.scaled_backward(self.k, self.inner, self.row_k, self.rows)
        return self._scaled(self.k) if self.sampled else self.flops

    @property
    def overhead(self) -> int:
        return self.cost() - self.approx_flops.total

    def saves_time(self, keep: float) -> bool:
        """False when a measured timing says ``keep`` is not faster than the dense op."""
        times = dict(self.timing)
        return keep not in times or 1.0 not in times or times[keep] < times[1.0]

    def with_(self, **changes: object) -> NodePlan:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, kw_only=True)
class Plan:
    """The whole decision for a model, stored in ``GraphModule.meta["approxcompile"]``."""

    budget: float
    method: Method
    nodes: tuple[NodePlan, ...]
    other_flops: int  # FLOPs FlopCounterMode counts outside matmul/linear/conv nodes
    note: str | None = None  # e.g. "no candidate nodes"
    mode: Mode = "forward"  # ApproxConfig.mode: which products the sampled nodes shrink
    scores: Scores = "activations"  # ApproxConfig.scores: what the forward samples are scored by
    frontend: str = "fx"  # how the model was captured: "fx" | "export" | "dynamo"
    frontend_reason: str = ""  # why that frontend (auto's choice, the mode handling)

    @property
    def dense_flops(self) -> int:
        return sum(n.flops.total for n in self.nodes) + self.other_flops

    @property
    def approx_flops(self) -> int:
        """Planned training FLOPs, sampling overhead included."""
        return sum(n.cost() for n in self.nodes) + self.other_flops

    @property
    def counted_flops(self) -> int:
        """Planned FLOPs FlopCounterMode will see (products only, no overhead)."""
        return sum(n.approx_flops.total for n in self.nodes) + self.other_flops

    @property
    def fraction(self) -> float:
        return self.approx_flops / self.dense_flops if self.dense_flops else 1.0
