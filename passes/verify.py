"""Verify: the rewritten graph is well formed and, in eval mode, computes what the original did."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from approxcompile.errors import VerificationError
from approxcompile.passes.base import VerifyResult
from approxcompile.passes.trace import share_parameters


def _detach(v: Any) -> Any:
    return v.detach() if isinstance(v, torch.Tensor) else v


def _eval_outputs(
    module: nn.Module, example_inputs: Sequence[Any], kwargs: dict[str, Any] | None = None
) -> Any:
    was_training = module.training
    module.eval()
    try:
        # Grad mode on: some modules take another code path without it (nn.TransformerEncoderLayer's
        # fused eval kernel), which a graph captured with autograd on does not follow.
        with torch.enable_grad():
            return tree_map(_detach, module(*example_inputs, **(kwargs or {})))
    finally:
        module.train(was_training)


def verify(
    gm: fx.GraphModule,
    original: nn.Module,
    example_inputs: Sequence[Any],
    *,
    original_inputs: tuple[Sequence[Any], dict[str, Any]] | None = None,
) -> VerifyResult:
    """``gm.graph.lint()``, then eval outputs of ``gm`` equal those of ``original`` exactly.

    ``original`` runs as a parameter-sharing copy, so its training flags stay as they were;
    it is called with ``original_inputs`` (args, kwargs) when given, else ``example_inputs``.
    """
    try:
        gm.graph.lint()
    except Exception as e:
        raise VerificationError(f"[verify] the rewritten graph is malformed: {e}") from e
    args, kwargs = original_inputs if original_inputs is not None else (example_inputs, {})
    want, want_spec = tree_flatten(_eval_outputs(share_parameters(original), args, kwargs))
    got, got_spec = tree_flatten(_eval_outputs(gm, example_inputs))
    if want_spec != got_spec:
        raise VerificationError(f"[verify] output structure changed: {want_spec} -> {got_spec}")
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        if isinstance(w, torch.Tensor) and not torch.equal(w, g):
            diff = (w.float() - g.float()).abs().max().item() if w.shape == g.shape else "shape"
            raise VerificationError(
                f"[verify] in eval mode output {i} of the rewritten module differs from the original "
                f"(max abs difference {diff}); please report this with the model"
            )
    return VerifyResult(graph_module=gm, modified=False, outputs=len(want))
