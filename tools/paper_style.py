"""The reference to beat: forward top-k sampling written the plain way, as in the paper's code.

For a product over an inner dimension of size n with keep ratio r (k = round(r·n)):

    scores_i = ‖x[..., i]‖ · ‖W[:, i]‖           column (linear/matmul) or channel (conv) norms
    idx      = torch.topk(scores, k).indices
    y        = dense_op(x.index_select(i, idx), W.index_select(i, idx))

Autograd backpropagates through the two ``index_select`` calls, so the input and weight
gradients are the dense ops' gradients scattered back into full-size zero-filled
buffers. The norms of ``W``'s columns are strided reductions (``W.norm(dim=0)``). Nothing
here is tuned: this is what a user who hand-replaces layers writes, and what
``approxcompile``'s sampled ops must beat on wall-clock time. Exact in ``eval()``.

``apply_paper_style(model, plan)`` (or ``paper_style``, which also says what it did) gives
the paper-style version of ``model`` at the layers and keep ratios an ``approxcompile``
plan chose, so the two implementations are compared on the same approximation:

    fast = approxcompile.optimize(copy.deepcopy(model), 0.4, example_inputs=(x,))
    paper = apply_paper_style(model, fast.meta["approxcompile"])

Sampled ``nn.Linear`` / ``nn.Conv2d`` modules are swapped for :class:`PaperLinear` /
:class:`PaperConv2d`. Sampled function calls (``@``, ``torch.matmul``, ``torch.bmm``,
e.g. the two attention products) are sampled too: the model is traced with
``torch.fx.symbolic_trace`` and those nodes call a :class:`PaperMatmul` submodule. The
plan names a function node ``<owning module path>.<fx node name>``, which the trace here
reproduces; a sampled node this cannot find (e.g. ``F.linear`` on a bare parameter, or a
model traced with leaf modules) stays exact and is listed in ``PaperResult.left_exact``.
When any matmul is sampled the result is a ``GraphModule``; otherwise the model's own class.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from approxcompile.plan import Plan, kept_count

_MATMULS = (operator.matmul, torch.matmul, torch.bmm)


def _topk(scores: Tensor, k: int) -> Tensor:
    return torch.topk(scores, k, sorted=False).indices


def paper_linear(x: Tensor, weight: Tensor, bias: Tensor | None, keep: float) -> Tensor:
    """``F.linear`` over the k input features with the largest ``‖x col‖·‖W col‖``."""
    n = weight.shape[1]
    k = kept_count(keep, n)
    if k >= n:
        return F.linear(x, weight, bias)
    with torch.no_grad():
        scores = x.reshape(-1, n).norm(dim=0) * weight.norm(dim=0)
        idx = _topk(scores, k)
    return F.linear(x.index_select(-1, idx), weight.index_select(1, idx), bias)


def paper_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int] | str,
    dilation: Sequence[int],
    keep: float,
) -> Tensor:
    """``F.conv2d`` (groups=1) over the k input channels with the largest ``‖x[:, c]‖·‖W[:, c]‖``."""
    n = weight.shape[1]
    k = kept_count(keep, n)
    if k >= n:
        return F.conv2d(x, weight, bias, stride, padding, dilation)
    with torch.no_grad():
        scores = torch.linalg.vector_norm(x, dim=(0, 2, 3)) * torch.linalg.vector_norm(weight, dim=(0, 2, 3))
        idx = _topk(scores, k)
    return F.conv2d(x.index_select(1, idx), weight.index_select(1, idx), bias, stride, padding, dilation)


def paper_matmul(a: Tensor, b: Tensor, keep: float) -> Tensor:
    """``a @ b`` over the k contracted indices with the largest ``‖a[..., i]‖·‖b[..., i, :]‖``.

    One index set serves every batch entry (norms reduce over the batch dimensions too).
    """
    if a.dim() < 2 or b.dim() < 2:
        return torch.matmul(a, b)
    n = a.shape[-1]
    k = kept_count(keep, n)
    if k >= n:
        return torch.matmul(a, b)
    with torch.no_grad():
        scores = a.reshape(-1, n).norm(dim=0) * b.transpose(-1, -2).reshape(-1, n).norm(dim=0)
        idx = _topk(scores, k)
    return torch.matmul(a.index_select(-1, idx), b.index_select(-2, idx))


class PaperLinear(nn.Module):
    """An ``nn.Linear`` that samples in ``train()``; holds the original's parameters under the same names."""

    def __init__(self, linear: nn.Linear, keep: float) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.keep = keep

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return F.linear(x, self.weight, self.bias)
        return paper_linear(x, self.weight, self.bias, self.keep)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, keep={self.keep:.3g}"


class PaperConv2d(nn.Module):
    """An ``nn.Conv2d`` (groups=1, zero padding) that samples input channels in ``train()``."""

    def __init__(self, conv: nn.Conv2d, keep: float) -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"paper-style sampling needs groups=1 and zero padding, got {conv}")
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.weight = conv.weight
        self.bias = conv.bias
        self.keep = keep

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        return paper_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.keep)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, keep={self.keep:.3g}"


class PaperMatmul(nn.Module):
    """A graph-called ``a @ b`` that samples in ``train()``; a module so ``.eval()`` reaches it."""

    def __init__(self, keep: float) -> None:
        super().__init__()
        self.keep = keep

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return paper_matmul(a, b, self.keep) if self.training else torch.matmul(a, b)

    def extra_repr(self) -> str:
        return f"keep={self.keep:.3g}"


@dataclass(frozen=True)
class PaperResult:
    """The paper-style model and what it did with each sampled node of the plan."""

    model: nn.Module
    sampled: dict[str, float]  # plan node name -> keep ratio applied
    left_exact: dict[str, str]  # plan node name -> why the paper-style model runs it exactly


def _qualified(node: fx.Node) -> str:
    """The plan's name for a function node: the path of its innermost module, then the node name."""
    stack = node.meta.get("nn_module_stack") or {}
    owner = next(reversed(stack.values()))[0] if stack else ""
    return f"{owner}.{node.name}" if owner else node.name


def _sample_matmuls(model: nn.Module, keeps: dict[str, float]) -> tuple[nn.Module, set[str]]:
    """Trace ``model`` and route the named matmul nodes through :class:`PaperMatmul` submodules.

    ``a @ b -> paper_matmul_<i>(a, b)``. Returns the traced module and the names it rewrote.
    """
    gm = fx.symbolic_trace(model)
    done: set[str] = set()
    for node in list(gm.graph.nodes):
        name = _qualified(node)
        if node.op != "call_function" or node.target not in _MATMULS or name not in keeps:
            continue
        target = f"paper_matmul_{len(done)}"
        gm.add_submodule(target, PaperMatmul(keeps[name]))
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(target, node.args, node.kwargs)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        done.add(name)
    gm.graph.lint()
    gm.recompile()
    return gm, done


def paper_style(model: nn.Module, plan: Plan) -> PaperResult:
    """A deep copy of ``model`` with the plan's sampled layers in paper style, at the plan's keep ratios.

    The copy's parameters are new tensors with the same values (so it trains
    independently of ``model``); ``state_dict()`` keys are unchanged for swapped modules.
    """
    model = copy.deepcopy(model)
    chosen = [node for node in plan.nodes if node.sampled]
    function_keeps = {n.name: n.keep for n in chosen if n.kind == "matmul"}
    sampled: dict[str, float] = {}
    left_exact: dict[str, str] = {}
    if function_keeps:
        # Trace before swapping modules: the tracer would bake the swapped modules'
        # ``self.training`` branch into the graph.
        model, done = _sample_matmuls(model, function_keeps)
        for name, keep in function_keeps.items():
            if name in done:
                sampled[name] = keep
            else:
                left_exact[name] = "no matmul node of this name in torch.fx.symbolic_trace's graph"
    modules = dict(model.named_modules())
    for node in chosen:
        if node.kind == "matmul":
            continue
        module = modules.get(node.name)
        if isinstance(module, nn.Linear) and node.kind == "linear":
            _swap(model, node.name, PaperLinear(module, node.keep))
            sampled[node.name] = node.keep
        elif isinstance(module, nn.Conv2d) and node.kind == "conv":
            _swap(model, node.name, PaperConv2d(module, node.keep))
            sampled[node.name] = node.keep
        else:
            left_exact[node.name] = (
                f"paper style has no version of {node.op} ({node.kind}) outside nn modules"
            )
    return PaperResult(model, sampled, left_exact)


def apply_paper_style(model: nn.Module, plan: Plan) -> nn.Module:
    """The paper-style model of :func:`paper_style`, without the bookkeeping."""
    return paper_style(model, plan).model


def _swap(model: nn.Module, qualname: str, new: nn.Module) -> None:
    parent_name, _, child = qualname.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
