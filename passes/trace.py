"""Trace: user ``nn.Module`` -> ``torch.fx.GraphModule`` sharing its parameters.

The user's module is never touched: tracing runs on a copy of the module tree whose
submodules are new objects holding the *same* ``Parameter`` and buffer tensors, so the
rewritten model trains the user's weights while ``.train()``/``.eval()`` on it leave the
user's modules alone. ``state_dict()`` keys are the original's.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from approxcompile.errors import TraceError
from approxcompile.passes.base import TraceResult

_TORCH_DIR = os.path.dirname(torch.__file__)


def share_parameters(module: nn.Module, memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """A copy of the module tree with new module objects and the same tensors."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    clone = object.__new__(type(module))  # not copy.copy: parametrized modules refuse pickling
    clone.__dict__.update(module.__dict__)
    memo[id(module)] = clone
    clone.__dict__["_parameters"] = dict(module._parameters)
    clone.__dict__["_buffers"] = dict(module._buffers)
    clone.__dict__["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    clone.__dict__["_modules"] = {
        name: None if child is None else share_parameters(child, memo)
        for name, child in module._modules.items()
    }
    return clone


class _Tracer(fx.Tracer):
    def __init__(self, leaf_modules: tuple[type[nn.Module], ...]) -> None:
        super().__init__()
        self._leaf_types = leaf_modules

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self._leaf_types) or super().is_leaf_module(m, module_qualified_name)


def _user_frame(exc: BaseException) -> tuple[str, type[nn.Module] | None]:
    """The innermost frame outside torch that the failure passed through, and its module type."""
    where, owner = "", None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        filename = frame.f_code.co_filename
        if filename.startswith(_TORCH_DIR) or filename.startswith(os.path.dirname(__file__)):
            continue
        line = traceback.FrameSummary(filename, lineno, frame.f_code.co_name).line
        where = f"{filename}:{lineno} in {frame.f_code.co_name}: {line}"
        self_obj = frame.f_locals.get("self")
        owner = type(self_obj) if isinstance(self_obj, nn.Module) else owner
    return where, owner


def _adopt_tree(gm: fx.GraphModule, root: nn.Module) -> None:
    """Give ``gm`` the root's whole module tree so ``state_dict()`` matches the original.

    ``fx.GraphModule`` copies only what the graph references and registers every tensor
    as a persistent buffer; unused submodules would vanish and non-persistent buffers
    would appear in checkpoints.
    """
    # Rebuilt in the root's order (then whatever the graph added), so state_dict() lists the
    # keys in the original's order, not in the order the graph first used them.
    for attr in ("_modules", "_parameters", "_buffers"):
        ours, theirs = getattr(gm, attr), getattr(root, attr)
        gm.__dict__[attr] = {**theirs, **{k: v for k, v in ours.items() if k not in theirs}}
    traced_constants = set(gm._buffers) - set(root._buffers)  # e.g. _tensor_constant0
    gm._non_persistent_buffers_set = set(root._non_persistent_buffers_set) | traced_constants


def trace(
    model: nn.Module,
    *,
    leaf_modules: tuple[type[nn.Module], ...] = (),
    concrete_args: dict[str, Any] | None = None,
) -> TraceResult:
    """``model`` -> ``GraphModule`` (a new module; ``model`` is not mutated).

    ``concrete_args`` fixes arguments to values (``{"mask": None}``), as ``torch.fx`` does.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize() needs an nn.Module, got {type(model).__name__}")
    root = share_parameters(model)
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(root, concrete_args=concrete_args or None)
    except Exception as e:
        where, owner = _user_frame(e)
        if owner is not None and owner is not type(model):
            fix = (
                f"mark {owner.__name__} as a leaf so it runs as one opaque call: "
                f"ApproxConfig(leaf_modules=({owner.__name__},))"
            )
        else:
            fix = (
                "move the data-dependent code into a submodule and list its type in "
                "ApproxConfig(leaf_modules=...)"
            )
        raise TraceError(
            f"[trace] torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {e}\n"
            f"  failing code: {where or 'unknown (no frame outside torch)'}\n"
            f"  fix: {fix}, or let ApproxConfig(frontend='auto') capture it with torch.export or dynamo"
        ) from e
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    _adopt_tree(gm, root)
    gm.train(model.training)
    return TraceResult(graph_module=gm, modified=True, nodes=len(gm.graph.nodes))
