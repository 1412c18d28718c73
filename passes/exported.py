"""torch.export capture: user ``nn.Module`` -> plain ``fx.GraphModule`` of ATen ops, right in both modes.

::

    export(model.train())  -> train graph, its mode-dependent arguments gated on ``self.training``
    export(model.eval())   -> eval graph (the model's own exact eval graph), used only when the
                              train graph differs from it beyond those arguments

``ExportedProgram.module()`` cannot switch modes (``.train()`` raises), so its graph moves into
a plain ``GraphModule`` over a parameter-sharing copy of the user's module tree; its extra
attributes (``_guards_fn``, the bodies of ``torch.no_grad()`` regions, lifted constants) come
along and the pytree in/out specs stay on the graph. A train-mode export bakes ``training=True``
into dropout and batch norm, ``dropout_p`` into attention and the ``num_batches_tracked`` step;
gating them on the module's flag makes the train graph exact and free of buffer updates in
``eval()``, which the planning passes rely on. Code that branches on ``self.training`` still
yields two different graphs: the result then runs the eval graph in ``eval()``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.export import Dim
from torch.utils._pytree import tree_map

from approxcompile.passes.trace import _adopt_tree, share_parameters

# ATen ops whose arguments say whether the model is training, by argument name.
_TRAIN_ARGS = ("train", "training", "use_input_stats")
_ATTENTION = torch.ops.aten.scaled_dot_product_attention.default


def _when_training(training: bool, value: Any) -> Any:
    """``value`` in training, 0 in eval: sdpa's ``dropout_p`` and the batch-norm step counter."""
    return value if training else type(value)(0)


def _dynamic_shapes(args: Sequence[Any]) -> tuple[Any, ...]:
    """``Dim.AUTO`` on every dimension: export keeps what stays symbolic, specialises the rest."""

    def dims(v: Any) -> Any:
        return {i: Dim.AUTO for i in range(v.dim())} if isinstance(v, torch.Tensor) else None

    return tuple(tree_map(dims, a) for a in args)


def export_graph(root: nn.Module, args: tuple[Any, ...], training: bool) -> fx.GraphModule:
    """Export ``root`` in one mode and return the unlifted graph module (not yet over ``root``)."""
    was = root.training
    root.train(training)
    try:
        ep = torch.export.export(root, args, strict=False, dynamic_shapes=_dynamic_shapes(args))
    finally:
        root.train(was)
    return ep.module()


def _over_root(unlifted: fx.GraphModule, root: nn.Module, name: str) -> fx.GraphModule:
    """The unlifted graph as a plain ``GraphModule`` whose module tree is ``root``'s.

    Attributes the graph needs that ``root`` lacks (``_guards_fn``, ``submod_*`` bodies of
    ``no_grad`` regions, lifted constants) are copied from the unlifted module.
    """
    gm = fx.GraphModule(unlifted, unlifted.graph, name)
    _adopt_tree(gm, root)
    return gm


def gate_training(gm: fx.GraphModule) -> int:
    """Replace the mode constants a train-mode export baked in by ``self.training``; returns the count.

    ::

        dropout(x, 0.1, True)                  -> dropout(x, 0.1, training)
        batch_norm(x, w, b, m, v, True, ...)   -> batch_norm(x, w, b, m, v, training, ...)
        add_(num_batches_tracked, 1)           -> add_(num_batches_tracked, _when_training(training, 1))
        sdpa(q, k, v, mask, 0.1, ...)          -> sdpa(q, k, v, mask, _when_training(training, 0.1), ...)
    """
    from approxcompile.passes.rewrite import _training_flag

    graph = gm.graph
    flag = None
    gated = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        for i, arg in enumerate(schema.arguments):
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            if arg.name in _TRAIN_ARGS and value is True:
                what: Any = "flag"
            elif node.target is _ATTENTION and arg.name == "dropout_p" and value:
                what = value
            elif i == 1 and _is_step_counter(node):
                what = value
            else:
                continue
            flag = flag or _training_flag(graph)
            if what == "flag":
                new: Any = flag
            else:
                with graph.inserting_before(node):
                    new = graph.call_function(_when_training, (flag, what))
            if i < len(node.args):
                node.args = (*node.args[:i], new, *node.args[i + 1 :])
            else:
                node.kwargs = {**node.kwargs, arg.name: new}
            gated += 1
    if gated:
        gm.recompile()
    return gated


def _is_step_counter(node: fx.Node) -> bool:
    return (
        node.target is torch.ops.aten.add_.Tensor
        and isinstance(node.args[0], fx.Node)
        and str(node.args[0].target).endswith("num_batches_tracked")
    )


def _signature(gm: fx.GraphModule) -> list[str]:
    """The ops of a graph in order, without arguments: equal for graphs that differ in constants only.

    The gating helpers and the batch-norm step counter (absent from eval graphs) are left out.
    """
    return [
        str(n.target)
        for n in gm.graph.nodes
        if n.op in ("call_function", "call_module")
        and n.target is not _when_training
        and not _is_step_counter(n)
    ]


class ModeGraphModule(fx.GraphModule):
    """A ``GraphModule`` that runs a second, exact graph in ``eval()``.

    For models whose code branches on ``self.training``: the graph (which the passes plan and
    rewrite) is the train-mode one; ``eval()`` runs the model's own eval graph, which shares
    every module, parameter and buffer and is not a registered submodule, so ``state_dict()``
    keys are unchanged.
    """

    def recompile(self) -> Any:
        code = super().recompile()
        cls = type(self)
        train_forward = cls.forward

        @functools.wraps(train_forward)  # callers that inspect the signature see the graph's inputs
        def forward(self: ModeGraphModule, *args: Any, **kwargs: Any) -> Any:
            eval_module = self.__dict__.get("_eval_module")
            if self.training or eval_module is None:
                return train_forward(self, *args, **kwargs)
            return eval_module.forward(*args, **kwargs)

        cls.forward = forward
        return code


def capture_export(model: nn.Module, example_inputs: Sequence[Any]) -> tuple[fx.GraphModule, str]:
    """``model`` -> (a ``GraphModule`` of ATen ops sharing its tensors, what was done for the modes)."""
    root = share_parameters(model)
    args = tuple(example_inputs)
    name = type(model).__name__
    train = _over_root(export_graph(root, args, training=True), root, name)
    gated = gate_training(train)
    evaluate = _over_root(export_graph(root, args, training=False), root, name)
    if _signature(train) == _signature(evaluate):
        # Same ops in the same order: the gated train graph is the eval graph as well.
        train.train(model.training)
        return train, f"one graph, {gated} mode-dependent argument(s) gated on self.training"
    modal = ModeGraphModule(train, train.graph, name)
    _adopt_tree(modal, root)
    for key, value in train.__dict__.items():
        if key not in modal.__dict__:
            modal.__dict__[key] = value
    modal.__dict__["_eval_module"] = evaluate
    modal.train(model.training)
    return modal, "train and eval graphs differ (the code reads self.training): eval() runs the eval graph"
