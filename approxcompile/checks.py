"""What ``optimize`` checks before it runs anything: example inputs, weights, overrides.

Each check fails before the first pass, with an error that says what is wrong and what to
do, instead of a raw ``TypeError`` from deep inside a pass (or after all the work).
"""

from __future__ import annotations

import difflib
import inspect
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_leaves

from approxcompile.config import ApproxConfig
from approxcompile.errors import ExampleInputError, NonFiniteError

_USAGE = "pass example_inputs=(x,) (the positional inputs of forward) or a dict of keyword inputs"


@dataclass(frozen=True)
class ExampleInputs:
    """The example inputs as ``forward(*args, **kwargs)`` takes them."""

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    # Optional arguments the inputs leave out whose default is None: the trace fixes them
    # to None (a proxy would take every ``if mask is not None`` branch).
    fixed_none: tuple[str, ...] = ()

    def positional(self, gm: fx.GraphModule) -> tuple[Any, ...]:
        """The inputs in the order of ``gm``'s placeholders (kwargs placed by name)."""
        if not self.kwargs:
            return self.args
        values = list(self.args)
        for node in [n for n in gm.graph.nodes if n.op == "placeholder"][len(self.args) :]:
            name = str(node.target)
            if name in self.kwargs:
                values.append(self.kwargs[name])
            elif node.args:
                values.append(node.args[0])  # its default
            else:
                raise ExampleInputError(
                    f"[inputs] no example value for forward's argument {name!r}; {_USAGE}"
                )
        return tuple(values)


def _signature(model: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def example_inputs(model: nn.Module, given: Any) -> ExampleInputs:
    """Normalise ``example_inputs`` (tuple, list, dict, one tensor, any iterable) and bind it."""
    if given is None:
        raise ExampleInputError(f"[inputs] optimize() needs example inputs to measure the model; {_USAGE}")
    kwargs: dict[str, Any] = {}
    args: tuple[Any, ...] = ()
    if isinstance(given, torch.Tensor):
        # Iterating would split the batch into rows; say what was meant instead.
        raise ExampleInputError(
            f"[inputs] example_inputs must be a tuple of inputs, got one Tensor {tuple(given.shape)}; "
            "pass example_inputs=(x,)"
        )
    if isinstance(given, Mapping):
        kwargs = dict(given)
        if not all(isinstance(k, str) for k in kwargs):
            raise ExampleInputError(
                f"[inputs] the keys of a dict of example inputs must be argument names, got {list(kwargs)}"
            )
    elif isinstance(given, (tuple, list)):
        args = tuple(given)
    elif isinstance(given, Iterable) and not isinstance(given, (str, bytes)):
        args = tuple(given)
    else:
        raise ExampleInputError(
            f"[inputs] example_inputs must be a tuple of inputs, got {type(given).__name__}; {_USAGE}"
        )
    sig = _signature(model)
    if sig is None:
        return ExampleInputs(args, kwargs)
    name = f"{type(model).__name__}.forward{sig}"
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        keyword_only = [p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY]
        hint = (
            f"; pass keyword-only inputs as a dict, e.g. example_inputs={{{keyword_only[0]!r}: x}}"
            if keyword_only and not kwargs
            else ""
        )
        raise ExampleInputError(f"[inputs] the example inputs do not fit {name}: {e}{hint}") from e
    kinds = {p.kind for p in sig.parameters.values()}
    if inspect.Parameter.VAR_POSITIONAL in kinds or inspect.Parameter.VAR_KEYWORD in kinds:
        if kwargs:
            raise ExampleInputError(
                f"[inputs] keyword example inputs need a forward without *args / **kwargs, not {name}"
            )
        return ExampleInputs(args, kwargs)
    fixed = tuple(
        p.name for p in sig.parameters.values() if p.name not in bound.arguments and p.default is None
    )
    return ExampleInputs(args, kwargs, fixed)


def _bad_values(t: torch.Tensor) -> str | None:
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return None
    finite = torch.isfinite(t.detach())
    if bool(finite.all()):
        return None
    nan = int(torch.isnan(t.detach()).sum())
    inf = t.numel() - int(finite.sum()) - nan
    parts = [f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else ""]
    return " and ".join(p for p in parts if p) + f" of {t.numel()} values"


def check_values(model: nn.Module, inputs: ExampleInputs) -> None:
    """NaN / Inf in a parameter, buffer or example input, or an empty example input, is an error.

    A plan measured on NaN is meaningless and the eval check cannot hold (NaN != NaN).
    """
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            bad = _bad_values(t)
            if bad:
                raise NonFiniteError(
                    f"[inputs] {kind} {name!r} of {type(model).__name__} holds NaN/Inf ({bad}); "
                    "optimize needs finite weights: fix or re-initialise them first"
                )
    leaves = tree_leaves((inputs.args, dict(inputs.kwargs)))
    for i, t in enumerate(leaf for leaf in leaves if isinstance(leaf, torch.Tensor)):
        bad = _bad_values(t)
        if bad:
            raise NonFiniteError(
                f"[inputs] example input {i} (shape {tuple(t.shape)}) holds NaN/Inf ({bad}); "
                "pass a batch of finite values"
            )
        if t.numel() == 0:
            raise ExampleInputError(
                f"[inputs] example input {i} is empty (shape {tuple(t.shape)}): costs and errors are "
                "measured on it; pass a non-empty batch of the shape you train with"
            )


def warn_unmatched_overrides(config: ApproxConfig, names: set[str], modules: Iterable[str]) -> None:
    """Warn about a module-name or regex override that matched no product node.

    ``names`` are what overrides are matched against (node names and owning modules);
    the warning lists the closest of them and of the model's module names.
    """
    known = sorted(names | {m for m in modules if m})

    def closest(pattern: str) -> str:
        near = difflib.get_close_matches(pattern, known, n=3, cutoff=0.5)
        return ", ".join(near) if near else ", ".join(known[:5])

    for pattern, _ in config.module_name_regex_overrides:
        if not any(re.fullmatch(pattern, n) for n in names):
            warnings.warn(
                f"[select] module_name_regex override {pattern!r} matched no matmul / linear / conv node "
                f"(closest names: {closest(pattern)})",
                stacklevel=3,
            )
    for name, _ in config.module_name_overrides:
        if name not in names:
            warnings.warn(
                f"[select] module_name override {name!r} matched no matmul / linear / conv node "
                f"(closest names: {closest(name)})",
                stacklevel=3,
            )


_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def module_hooks(module: nn.Module) -> list[str]:
    """The kinds of module hooks ``module`` has (``_forward_hooks``, ...)."""
    return [k for k in _HOOKS if getattr(module, k, None)]


def hooked_modules(model: nn.Module) -> frozenset[str]:
    """Names of the submodules of ``model`` with module hooks: the rewrite leaves exact ones as modules."""
    return frozenset(name for name, m in model.named_modules() if module_hooks(m))


def warn_hooks_on_sampled(model: nn.Module, nodes: Iterable[Any]) -> None:
    """A sampled layer runs as a function call in the rewritten graph: its module hooks cannot fire."""
    modules = dict(model.named_modules())
    for plan in nodes:
        m = modules.get(plan.name)
        if not plan.sampled or m is None:
            continue
        kinds = module_hooks(m)
        if kinds:
            names = ", ".join(k.strip("_") for k in kinds)
            warnings.warn(
                f"[rewrite] {plan.name} has hooks ({names}) that will not fire in the "
                "rewritten module: the sampled layer runs as a function call. Keep it exact "
                f"(ApproxConfig().set_module_name({plan.name!r}, NodeOverride(exact=True))) if they must run",
                stacklevel=3,
            )
