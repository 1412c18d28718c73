"""Shape propagation: example inputs -> every node's ``tensor_meta`` (shape, dtype, requires_grad).

Runs the graph once in eval mode (so BatchNorm statistics are not updated) with autograd
on (so ``requires_grad`` tells which products need an input gradient), and keeps the
operands of every matmul / linear / conv node for the cost model's sensitivity
measurements. Writes ``node.meta["tensor_meta"]`` (torch.fx's own key); the graph is
not changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from approxcompile.errors import ExampleInputError
from approxcompile.passes.base import ShapeResult
from approxcompile.passes.match import match


def _describe(values: Sequence[Any]) -> str:
    def one(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return f"Tensor{tuple(v.shape)}:{str(v.dtype).removeprefix('torch.')}"
        return type(v).__name__

    return ", ".join(one(v) for v in values)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.captured: dict[str, tuple[Any, ...]] = {}
        self.extra_traceback = False  # our own error already names the node

    def _value(self, operand: Any) -> Any:
        """The tensor behind a site operand (a node, or a parameter's qualified name)."""
        if isinstance(operand, fx.Node):
            value = self.env[operand]
        elif isinstance(operand, str):
            value = self.module.get_parameter(operand)
        else:
            value = operand
        return value.detach() if isinstance(value, torch.Tensor) else value

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            raise ExampleInputError(
                f"[shapes] the model failed on the example inputs at node {n.format_node()}\n"
                f"  its inputs: ({_describe(args)})\n  the model's error: {type(e).__name__}: {e}"
            ) from e
        assert isinstance(self.module, fx.GraphModule)
        site = match(self.module, n)
        if site is not None:
            self.captured[n.name] = tuple(self._value(o) for o in site.operands)
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = _extract_tensor_metadata(result)
        return result


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> ShapeResult:
    """Annotate ``gm`` in place with ``tensor_meta``; ``.captured`` maps node name -> operands."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(example_inputs) > len(placeholders) or not isinstance(example_inputs, (tuple, list)):
        raise ExampleInputError(
            f"[shapes] example_inputs must be a tuple of at most {len(placeholders)} positional inputs "
            f"({', '.join(p.name for p in placeholders)}), got {type(example_inputs).__name__} "
            f"of length {len(example_inputs) if isinstance(example_inputs, (tuple, list)) else '?'}"
        )
    recorder = _Recorder(gm)
    was_training = gm.training
    gm.eval()
    try:
        with torch.enable_grad():
            recorder.run(*example_inputs)
    finally:
        gm.train(was_training)
    return ShapeResult(graph_module=gm, modified=False, captured=recorder.captured)
