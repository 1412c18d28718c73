"""The sampled op kinds: everything the compiler knows about each, in one registry.

An :class:`OpKind` says, for one kind of product node,

- how to find it: its :class:`Matcher` s (fx ``call_function`` targets, ``call_module``
  module types; a kind may have several, e.g. one per graph dialect);
- what it computes: which site operands are the two factors, the inner dimension and the
  FLOPs of its products (:class:`Products`), and in backward mode the batch rows;
- how to run it sampled: the runtime op of each mode, the bias-free ``probe`` the
  sensitivity and timing passes measure, whether weight-only scores apply;
- how to export it: the name of its twin in ``approxcompile.export.estimators``.

Config aliases (``set_op_type(nn.Linear, ...)``), ``match``, the cost, sensitivity, timing and
rewrite passes, ``lower_for_export`` and the report read these entries; adding a kind is one
entry in :data:`KINDS` (plus its runtime op, its export twin and tests; docs/contributing.md).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from approxcompile import aten_matchers as aten
from approxcompile import ops
from approxcompile.choices import METHODS, MODES, SCORES, Method, Mode, OpType, Scores
from approxcompile.site import Site, call_args, owner, qualified

Shape = tuple[int, ...]
Probe = Callable[..., torch.Tensor]  # (keep, *, training, method, eps, generator) -> product
Backend = Literal["runtime", "export"]


@dataclass(frozen=True, kw_only=True)
class Matcher:
    """The fx nodes one kind recognises: ``node.op`` and its targets, each with a display name.

    For ``call_module`` the targets are module types (matched exactly, not subclasses);
    ``build(gm, node, display)`` returns the node's :class:`Site`, or ``None`` to decline.
    """

    node_op: Literal["call_function", "call_module"]
    targets: Mapping[Any, str]
    build: Callable[[fx.GraphModule, fx.Node, str], Site | None]


@dataclass(frozen=True, kw_only=True)
class Products:
    """A node's dense product, in the 2·M·N·K convention of ``FlopCounterMode``.

    ``forward`` FLOPs of the forward product (each gradient product costs as much);
    ``overhead_fixed`` / ``overhead_per_kept``: sampling overhead FLOPs (score norms and
    selection; gathers and scatters per kept column), which ``FlopCounterMode`` does not see.
    """

    inner: int
    forward: int
    overhead_fixed: int
    overhead_per_kept: int


@dataclass(frozen=True, kw_only=True)
class Support:
    """What one backend runs of a kind: its methods, modes and score sources."""

    methods: tuple[Method, ...]
    modes: tuple[Mode, ...]
    scores: tuple[Scores, ...]


@dataclass(frozen=True, kw_only=True)
class OpKind:
    """One sampled op kind. See the module docstring for what each part feeds."""

    name: str
    op_type: OpType  # the op type overrides are keyed by and the report shows
    matchers: tuple[Matcher, ...]
    factors: tuple[int, int]  # positions in Site.operands of the two factors (x, w) / (a, b)
    products: Callable[[Shape, Shape, Shape], Products | str]  # (x, w, out shapes) -> products or why not
    forward_op: Callable[..., torch.Tensor]
    probe: Callable[[tuple[Any, ...], Any, Mode], Probe]  # (operands, conv, mode) -> bias-free product
    backward_op: Callable[..., torch.Tensor] | None = None
    backward_rows: Callable[[Shape, Shape], int] | None = None  # (x, w shapes) -> dW's batch rows
    backward_unsupported: Callable[[Site], str | None] = lambda site: None
    backward_out: Callable[[Shape, Shape], int] = lambda xs, ws: ws[0]  # dX's inner dimension p
    backward_split: bool = False  # the backward op takes row_keep: dW's ratio apart from dX's keep
    weight_scores: bool = False  # supports scores="weights" (a weight operand to score by alone)
    export_twin: str | None = None  # function name in approxcompile.export.estimators
    symbol: str = "@"  # the report writes operand shapes joined by it

    def runtime_op(self, mode: Mode) -> Callable[..., torch.Tensor]:
        op = self.backward_op if mode == "backward" else self.forward_op
        if op is None:
            raise ValueError(f"op kind {self.name!r} has no {mode}-mode runtime op")
        return op

    def support(self, backend: Backend) -> Support:
        """Methods, modes and scores ``backend`` runs for this kind."""
        if backend == "runtime":
            modes = MODES if self.backward_op is not None else ("forward",)
            return Support(
                methods=METHODS, modes=modes, scores=SCORES if self.weight_scores else ("activations",)
            )
        modes = ("forward",) if self.export_twin is not None else ()
        return Support(methods=METHODS, modes=modes, scores=("activations",))


# -- matchers ---------------------------------------------------------------------------------


def _module_operands(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Module, str, tuple[Any, ...]]:
    mod = gm.get_submodule(str(node.target))
    name = str(node.target)
    x = node.args[0] if node.args else node.kwargs.get("input")
    bias = f"{name}.bias" if getattr(mod, "bias", None) is not None else None
    return mod, name, (x, f"{name}.weight", bias)


def _computed_weight(mod: nn.Module) -> str | None:
    """Why ``mod.weight`` is not a plain parameter a sampled op could read, if it is not."""
    if parametrize.is_parametrized(mod, "weight"):
        return "its weight is parametrized (torch.nn.utils.parametrize, e.g. weight_norm); left exact"
    if "weight" not in mod._parameters:
        return (
            "its weight is computed by a forward pre-hook (weight_norm / spectral_norm / pruning); left exact"
        )
    return None


def _linear_module(gm: fx.GraphModule, node: fx.Node, display: str) -> Site:
    mod, name, operands = _module_operands(gm, node)
    return Site("linear", display, name, name, operands, unsupported=_computed_weight(mod))


def _conv_module(gm: fx.GraphModule, node: fx.Node, display: str) -> Site:
    mod, name, operands = _module_operands(gm, node)
    assert isinstance(mod, nn.modules.conv._ConvNd)
    why = _computed_weight(mod)
    if mod.groups != 1:
        why = f"grouped convolution (groups={mod.groups}) is left exact"
    elif mod.padding_mode != "zeros":
        why = f"padding_mode={mod.padding_mode!r} is not sampled"
    conv = (mod.stride, mod.padding, mod.dilation)
    return Site("conv", display, name, name, operands, conv, mod.groups, why)


def _f_linear(gm: fx.GraphModule, node: fx.Node, display: str) -> Site:
    x, w, b = call_args(node, ("input", "weight", "bias"), (None,))
    name, where = aten.product_name(node)  # dynamo graphs: nn.Linear's own call takes its name
    return Site("linear", "Linear" if name == where else display, name, where, (x, w, b))


def _matmul(gm: fx.GraphModule, node: fx.Node, display: str) -> Site:
    a, b = call_args(node, ("input", "other" if display == "matmul" else "mat2"), ())
    return Site("matmul", display, qualified(node), owner(node), (a, b))


def _addmm(gm: fx.GraphModule, node: fx.Node, display: str) -> Site:
    bias, a, b, beta, alpha = call_args(node, ("input", "mat1", "mat2", "beta", "alpha"), (1, 1))
    why = None if (beta, alpha) == (1, 1) else "addmm with beta/alpha other than 1 is left exact"
    return Site("addmm", display, qualified(node), owner(node), (bias, a, b), unsupported=why)


def _baddbmm(gm: fx.GraphModule, node: fx.Node, display: str) -> Site:
    bias, a, b, beta, alpha = call_args(node, ("input", "batch1", "batch2", "beta", "alpha"), (1, 1))
    why = None if (beta, alpha) == (1, 1) else "baddbmm with beta/alpha other than 1 is left exact"
    return Site("baddbmm", display, qualified(node), owner(node), (bias, a, b), unsupported=why)


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = (None, 1, 0, 1, 1)  # bias, stride, padding, dilation, groups


def _f_conv(gm: fx.GraphModule, node: fx.Node, display: str) -> Site:
    x, w, b, stride, padding, dilation, groups = call_args(node, _CONV_ARGS, _CONV_DEFAULTS)
    why = None if groups == 1 else f"grouped convolution (groups={groups}) is left exact"
    conv = (stride, padding, dilation)
    return Site("conv", display, qualified(node), owner(node), (x, w, b), conv, groups, why)


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

# Why an sdpa node stays exact unless ApproxConfig(attention="decomposed") asks otherwise.
ATTENTION_EXACT = (
    "scaled_dot_product_attention is one fused kernel; sampling takes it apart into two batched "
    "products (ApproxConfig(attention='decomposed') lets the cost model do so)"
)


def _attention(gm: fx.GraphModule, node: fx.Node, display: str) -> Site:
    *operands, gqa = call_args(node, _SDPA_ARGS, (None, 0.0, False, None, False))
    why = "scaled_dot_product_attention with enable_gqa=True is left exact" if gqa else None
    if isinstance(node.target, torch._ops.OpOverload):  # export graphs: named as aten products are
        name, where = aten.product_name(node)
    else:
        name, where = qualified(node), owner(node)
    return Site("attention", display, name, where, tuple(operands), unsupported=why)


# -- products ---------------------------------------------------------------------------------


def _linear_products(xs: Shape, ws: Shape, out: Shape) -> Products:
    n, p = ws[-1], ws[0]
    rows = math.prod(xs) // n
    return Products(inner=n, forward=2 * rows * n * p, overhead_fixed=2 * n * (rows + p) + 2 * n,
                    overhead_per_kept=2 * (rows + p))  # fmt: skip


def _gather_overhead(inner: int, forward: int, xs: Shape, ws: Shape) -> Products:
    """Norms of both factors and the selection (fixed); gathers of both factors (per kept slice)."""
    numel = math.prod(xs) + math.prod(ws)
    return Products(inner=inner, forward=forward, overhead_fixed=2 * numel + 2 * inner,
                    overhead_per_kept=2 * numel // inner)  # fmt: skip


def _matmul_products(xs: Shape, ws: Shape, out: Shape) -> Products | str:
    if len(xs) < 2 or len(ws) < 2:
        return "matmul with a vector operand is left exact"
    batch = math.prod(torch.broadcast_shapes(xs[:-2], ws[:-2]))
    m, n, p = xs[-2], xs[-1], ws[-1]
    return _gather_overhead(n, 2 * batch * m * n * p, xs, ws)


def _attention_products(qs: Shape, ks: Shape, out: Shape) -> Products | str:
    """Q·Kᵀ (G, L, E) @ (G, E, S) and P·V (G, L, S) @ (G, S, Ev); ``inner`` is S (keep applies to E too)."""
    if len(qs) < 2 or len(ks) < 2 or len(out) < 2:
        return "attention on vectors is left exact"
    g = math.prod(torch.broadcast_shapes(qs[:-2], ks[:-2], out[:-2]))
    length, e, s, ev = qs[-2], qs[-1], ks[-2], out[-1]
    numel = g * (length * e + s * e + length * s + s * ev)  # Q, K, P, V: norms, then gathers
    forward = 2 * g * length * s * (e + ev)
    return Products(inner=s, forward=forward, overhead_fixed=2 * numel + 2 * g * (e + s),
                    overhead_per_kept=2 * numel // s)  # fmt: skip


def _conv_products(xs: Shape, ws: Shape, out: Shape) -> Products | str:
    # x (N, C, *in), w (O, C/groups, *k), out (N, O, *out)
    if len(xs) != len(ws):
        return "unbatched convolution input is left exact"
    forward = 2 * xs[0] * ws[0] * ws[1] * math.prod(ws[2:]) * math.prod(out[2:])
    return _gather_overhead(xs[1], forward, xs, ws)


def _conv_backward_unsupported(site: Site) -> str | None:
    if site.conv is not None and isinstance(site.conv[1], str):
        return f"padding={site.conv[1]!r} is left exact in backward mode (use integers)"
    return None


# -- probes: the node's product with the bias left out ----------------------------------------


def _weighted_probe(forward: Callable[..., torch.Tensor], backward: Callable[..., torch.Tensor]) -> Any:
    """``op(x, w, None[, stride, padding, dilation], keep=..., ...)`` of a linear or conv node."""

    def probe(operands: tuple[Any, ...], conv: Any, mode: Mode) -> Probe:
        x, w = operands[0], operands[1]
        op = backward if mode == "backward" else forward
        extra = tuple(conv) if conv is not None else ()
        return lambda keep, **kw: op(x, w, None, *extra, keep=keep, **kw)

    return probe


def _matmul_probe(operands: tuple[Any, ...], conv: Any, mode: Mode) -> Probe:
    a, b = operands[-2], operands[-1]
    op = ops.backward_sampled_matmul if mode == "backward" else ops.sampled_matmul
    return lambda keep, **kw: op(a, b, keep=keep, **kw)


def _attention_probe(operands: tuple[Any, ...], conv: Any, mode: Mode) -> Probe:
    q, k, v, mask, _, causal, scale = operands  # measured without dropout
    op = ops.backward_sampled_attention if mode == "backward" else ops.sampled_attention
    return lambda keep, **kw: op(q, k, v, mask, 0.0, causal, scale, keep=keep, **kw)


# -- the registry -----------------------------------------------------------------------------

_CONV_MODULES = {nn.Conv1d: "Conv1d", nn.Conv2d: "Conv2d", nn.Conv3d: "Conv3d"}
_CONV_FUNCTIONS = {F.conv1d: "F.conv1d", F.conv2d: "F.conv2d", F.conv3d: "F.conv3d"}
_MATMULS = {torch.matmul: "matmul", operator.matmul: "matmul", torch.bmm: "bmm", torch.mm: "mm"}
_ATTENTIONS = {F.scaled_dot_product_attention: "F.scaled_dot_product_attention"}

KINDS: dict[str, OpKind] = {
    kind.name: kind
    for kind in (
        OpKind(
            name="linear",
            op_type="linear",
            matchers=(
                Matcher(node_op="call_module", targets={nn.Linear: "Linear"}, build=_linear_module),
                Matcher(node_op="call_function", targets={F.linear: "F.linear"}, build=_f_linear),
                Matcher(node_op="call_function", targets=aten.LINEARS, build=aten.aten_linear),
            ),
            factors=(0, 1),
            products=_linear_products,
            forward_op=ops.sampled_linear,
            probe=_weighted_probe(ops.sampled_linear, ops.backward_sampled_linear),
            backward_op=ops.backward_sampled_linear,
            backward_rows=lambda xs, ws: math.prod(xs) // ws[-1],
            backward_split=True,
            weight_scores=True,
            export_twin="export_linear",
        ),
        OpKind(
            name="matmul",
            op_type="matmul",
            matchers=(
                Matcher(node_op="call_function", targets=_MATMULS, build=_matmul),
                Matcher(node_op="call_function", targets=aten.MATMULS, build=aten.aten_matmul),
            ),
            factors=(0, 1),
            products=_matmul_products,
            forward_op=ops.sampled_matmul,
            probe=_matmul_probe,
            # backward mode: indices per (batch, head) slice, dA over p and dB over m (ops/attention.py)
            backward_op=ops.backward_sampled_matmul,
            backward_rows=lambda xs, ws: xs[-2],
            backward_out=lambda xs, ws: ws[-1],
            export_twin="export_matmul",
        ),
        OpKind(
            name="attention",
            op_type="attention",
            matchers=(
                Matcher(node_op="call_function", targets=_ATTENTIONS, build=_attention),
                Matcher(node_op="call_function", targets=aten.ATTENTIONS, build=_attention),
            ),
            factors=(0, 1),
            products=_attention_products,
            forward_op=ops.sampled_attention,
            probe=_attention_probe,
            backward_op=ops.backward_sampled_attention,
            backward_rows=lambda qs, ks: qs[-2],  # dK and dV sum over the L queries
            backward_out=lambda qs, ks: ks[-2],  # dQ sums over the S keys (dP over Ev, same ratio)
            # no export twin: lower_for_export refuses a sampled attention node; leave it exact to export
        ),
        OpKind(
            name="addmm",
            op_type="linear",  # what nn.Linear traces to in older torch versions
            matchers=(
                Matcher(node_op="call_function", targets={torch.addmm: "addmm"}, build=_addmm),
                Matcher(node_op="call_function", targets=aten.ADDMMS, build=aten.aten_addmm),
            ),
            factors=(1, 2),
            products=_matmul_products,
            forward_op=ops.sampled_addmm,
            probe=_matmul_probe,
            export_twin="export_addmm",
        ),
        OpKind(
            name="baddbmm",
            op_type="matmul",
            matchers=(Matcher(node_op="call_function", targets={torch.baddbmm: "baddbmm"}, build=_baddbmm),),
            factors=(1, 2),
            products=_matmul_products,
            forward_op=ops.sampled_baddbmm,
            probe=_matmul_probe,
            export_twin="export_baddbmm",
        ),
        OpKind(
            name="conv",
            op_type="conv",
            matchers=(
                Matcher(node_op="call_module", targets=_CONV_MODULES, build=_conv_module),
                Matcher(node_op="call_function", targets=_CONV_FUNCTIONS, build=_f_conv),
                Matcher(node_op="call_function", targets=aten.CONVS, build=aten.aten_conv),
            ),
            factors=(0, 1),
            products=_conv_products,
            forward_op=ops.sampled_conv,
            probe=_weighted_probe(ops.sampled_conv, ops.backward_sampled_conv),
            backward_op=ops.backward_sampled_conv,
            backward_rows=lambda xs, ws: xs[0],
            backward_split=True,
            backward_unsupported=_conv_backward_unsupported,
            weight_scores=True,
            export_twin="export_conv",
            symbol="*",
        ),
    )
}


def _index() -> dict[tuple[str, Any], Matcher]:
    index: dict[tuple[str, Any], Matcher] = {}
    for kind in KINDS.values():
        for matcher in kind.matchers:
            for target in matcher.targets:
                assert (matcher.node_op, target) not in index, f"{target} is matched by two kinds"
                index[(matcher.node_op, target)] = matcher
    return index


MATCHERS = _index()


def match(gm: fx.GraphModule, node: fx.Node) -> Site | None:
    """The :class:`Site` of ``node`` if some kind's matcher recognises it, else ``None``."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        # torch.nn.utils.parametrize swaps in a subclass made on the fly: match its base.
        key: Any = type(mod).__bases__[0] if parametrize.is_parametrized(mod) else type(mod)
    elif node.op == "call_function":
        key = node.target
    else:
        return None
    try:
        matcher = MATCHERS.get((node.op, key))
    except TypeError:  # an unhashable target matches nothing
        return None
    return None if matcher is None else matcher.build(gm, node, matcher.targets[key])


def aliases() -> dict[Any, OpType]:
    """Python objects a user may name instead of an op type string: every matcher target."""
    return {t: kind.op_type for kind in KINDS.values() for m in kind.matchers for t in m.targets}


def backward_only_message() -> str:
    """Why a kind without a backward-mode op stays exact in backward mode."""
    with_op = [k.name for k in KINDS.values() if k.backward_op is not None]
    without = [k.name for k in KINDS.values() if k.backward_op is None]
    return f"backward mode samples {', '.join(with_op)} nodes only (not {' / '.join(without)})"


def runtime_ops() -> dict[Callable[..., Any], tuple[OpKind, Mode]]:
    """Every runtime sampled op, with its kind and mode."""
    found: dict[Callable[..., Any], tuple[OpKind, Mode]] = {}
    for kind in KINDS.values():
        found[kind.forward_op] = (kind, "forward")
        if kind.backward_op is not None:
            found[kind.backward_op] = (kind, "backward")
    return found


def symbol(op_type: str) -> str:
    """The operator the report writes between the operand shapes of an ``op_type`` node."""
    return next((k.symbol for k in KINDS.values() if k.op_type == op_type), "@")


def export_twin(kind: OpKind) -> Callable[..., torch.Tensor] | None:
    """``kind``'s exportable twin (imports the export package on first use)."""
    if kind.export_twin is None:
        return None
    from approxcompile.export import estimators

    twin: Callable[..., torch.Tensor] = getattr(estimators, kind.export_twin)
    return twin
