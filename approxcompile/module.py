"""The module ``optimize`` returns, and the module views the pipeline plans on.

``fast`` and ``model`` are two views of one set of tensors::

    model.layers[0]  ->  _parameters / _buffers dicts  <-  fast.layers[0]  (a different object)

Every submodule of ``fast`` is a new object (own ``training`` flag, own hooks, own
``forward`` call) that holds the *same* ``_parameters`` and ``_buffers`` dictionaries as
the user's module. So training either one trains both, BatchNorm statistics update for
both, and ``fast.to()`` / ``.double()`` / ``.half()``, which replace dictionary entries
when they cannot convert in place, convert both (and ``model.to()`` converts ``fast``).
Hooks are not shared: ``fast`` starts with a copy of the hooks ``model`` had when
``optimize`` was called, and hooks registered afterwards on either side stay on that side.

Planning runs on :func:`planning_view` copies instead: no hooks, buffers cloned, so
nothing ``optimize`` executes (about four forward passes) can change the user's state.

:class:`ApproxModule` is a ``torch.fx.GraphModule`` that pickles its graph node by node
(``torch.save(fast)`` / ``pickle``, ``copy.deepcopy``) rather than re-tracing generated
code with the tracer that built it, so it works for whichever frontend captured the graph.
A loaded module is standalone: it no longer shares tensors with ``model``.

A model whose code branches on ``self.training`` has two graphs (``ModeGraphModule`` from the
export frontend): the ``ApproxModule`` then also carries the eval graph, run in ``eval()``
over the same module tree, and pickles, deep-copies and converts both.
"""

from __future__ import annotations

import copy
import functools
import pickle
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)
_TENSOR_DICTS = ("_parameters", "_buffers", "_non_persistent_buffers_set")
_CONSTANTS = "_approxcompile_constants"  # names of plain tensor attributes ``_apply`` converts
_EVAL = "_approxcompile_eval"  # the eval-mode GraphModule, for code that reads self.training
_EXTRAS = "_approxcompile_extras"  # names of the eval graph's own attributes (not the model's)


def _new_like(module: nn.Module) -> nn.Module:
    """A new object of ``module``'s class with a shallow copy of its ``__dict__``.

    Not ``copy.copy``: parametrized modules refuse ``__getstate__``.
    """
    clone = object.__new__(type(module))
    clone.__dict__.update(module.__dict__)
    return clone


def module_view(
    module: nn.Module, *, share_dicts: bool, hooks: bool, memo: dict[int, nn.Module] | None = None
) -> nn.Module:
    """New module objects over ``module``'s tensors (a shared submodule stays shared).

    ``share_dicts``: hold the very ``_parameters`` / ``_buffers`` dictionaries (entries
    replaced on one side are replaced on the other) instead of copies of them.
    ``hooks``: start with copies of the forward / backward hooks instead of none.
    """
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    clone = _new_like(module)
    memo[id(module)] = clone
    if not share_dicts:
        for name in _TENSOR_DICTS:
            clone.__dict__[name] = copy.copy(module.__dict__[name])
    for name in _HOOK_DICTS:
        if name in module.__dict__:
            clone.__dict__[name] = OrderedDict(module.__dict__[name]) if hooks else OrderedDict()
    clone.__dict__["_modules"] = {
        name: None if child is None else module_view(child, share_dicts=share_dicts, hooks=hooks, memo=memo)
        for name, child in module._modules.items()
    }
    return clone


def isolate(module: nn.Module) -> nn.Module:
    """Make ``module`` (a tree of its own dictionaries) safe to run: no hooks, cloned buffers.

    Buffers a forward pass mutates in place (counters, BatchNorm statistics in train
    mode) then change the clones only. Parameters stay shared: cloning them would double
    the memory of a large model, and forward passes do not write them.
    """
    clones: dict[int, torch.Tensor] = {}
    for m in module.modules():
        for name in _HOOK_DICTS:
            if name in m.__dict__:
                m.__dict__[name] = OrderedDict()
        for key, buf in m._buffers.items():
            if buf is not None:
                if id(buf) not in clones:
                    clones[id(buf)] = buf.detach().clone()
                m._buffers[key] = clones[id(buf)]
    return module


def planning_view(model: nn.Module) -> nn.Module:
    """A copy of ``model`` to run during planning: same parameters, cloned buffers, no hooks."""
    return isolate(module_view(model, share_dicts=False, hooks=False))


def clone_inputs(value: Any) -> Any:
    """Example inputs with every tensor cloned, so in-place writes in ``forward`` stay local."""
    return torch.utils._pytree.tree_map(
        lambda t: t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t,
        value,
    )


def _resolve(root: Any, target: str) -> Any:
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class ApproxModule(fx.GraphModule):
    """A ``GraphModule`` that pickles, deep-copies and converts (``.to()``) like a plain module.

    Pickling stores the module state and the graph node by node (targets, arguments and
    the picklable part of each node's ``meta``, e.g. the plan ``report`` reads); loading
    rebuilds the same graph, so a loaded module continues training exactly where the
    saved one stood.
    """

    @property
    def eval_graph(self) -> fx.Graph | None:
        """The graph ``eval()`` runs when the model's code reads ``self.training``, else ``None``."""
        evaluate = self.__dict__.get(_EVAL)
        return None if evaluate is None else evaluate.graph

    def recompile(self) -> Any:
        code = super().recompile()
        if _EVAL not in self.__dict__:
            return code
        cls = type(self)  # GraphModule gives every instance a class of its own
        train_forward = cls.forward

        @functools.wraps(train_forward)  # callers that inspect the signature see the graph's inputs
        def forward(self: ApproxModule, *args: Any, **kwargs: Any) -> Any:
            if self.training:
                return train_forward(self, *args, **kwargs)
            return self.__dict__[_EVAL].forward(*args, **kwargs)

        cls.forward = forward
        return code

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> ApproxModule:
        super()._apply(fn, recurse)
        for holder in (self, self.__dict__.get(_EVAL)):
            if holder is not None:
                for name in holder.__dict__.get(_CONSTANTS, ()):
                    holder.__dict__[name] = fn(holder.__dict__[name])
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        state = {k: _portable(v) for k, v in self.__dict__.items() if k not in ("_graph", _EVAL)}
        state["_tracer_cls"] = None
        evaluate = self.__dict__.get(_EVAL)
        eval_spec = None
        if evaluate is not None:
            extras = {name: _portable(evaluate.__dict__[name]) for name in evaluate.__dict__.get(_EXTRAS, ())}
            eval_spec = (_graph_spec(evaluate.graph), extras, evaluate.__dict__.get(_CONSTANTS, ()))
        return (_rebuild, (ApproxModule, state, _graph_spec(self.graph), eval_spec))

    def __deepcopy__(self, memo: dict[int, Any]) -> ApproxModule:
        fn, args = self.__reduce__()
        return fn(*copy.deepcopy(args, memo))


class SkippedGuards(nn.Module):
    """Stands in for torch.export's input guards in a loaded module (see :func:`_portable`)."""

    _is_impure = True  # called for its side effect only: dead-code elimination must keep it

    def forward(self, *args: Any) -> None:
        return None


def _portable(value: Any) -> Any:
    """``value``, or a picklable stand-in for torch.export's ``_guards_fn``.

    The guards are a function compiled from source text at capture time that pickle cannot
    store; they only assert that inputs have the shapes the graph was captured for (the
    graph raises its own error otherwise), so a loaded module runs without them.
    """
    if type(value).__name__ == "GuardsFn" and isinstance(value, nn.Module):
        return SkippedGuards()
    return value


@dataclass(frozen=True)
class _Ref:
    """A node argument that names an earlier node (pickled in place of the ``fx.Node``)."""

    name: str


@dataclass(frozen=True)
class _OpRef:
    """A ``torch.ops`` operator by name (operator objects do not pickle): ``torch.ops.<path>``."""

    path: str


def _pack_target(target: Any) -> Any:
    if isinstance(target, torch._ops.OpOverload):
        namespace, name = target.name().split("::", 1)
        return _OpRef(f"{namespace}.{name.split('.')[0]}.{target._overloadname}")
    if isinstance(target, torch._ops.HigherOrderOperator):
        return _OpRef(f"higher_order.{target.name()}")
    return target


def _unpack_target(target: Any) -> Any:
    return _resolve(torch.ops, target.path) if isinstance(target, _OpRef) else target


def _picklable(value: Any) -> bool:
    try:
        pickle.dumps(value, protocol=2)  # torch.save's protocol, the narrowest in use
    except Exception:
        return False
    return True


def _pack_meta(value: Any) -> Any:
    """``torch.memory_format`` does not pickle: shape metadata keeps it by name."""
    if isinstance(value, TensorMetadata) and isinstance(value.memory_format, torch.memory_format):
        name: Any = str(value.memory_format).removeprefix("torch.")
        return value._replace(memory_format=name)
    return value


def _unpack_meta(value: Any) -> Any:
    if isinstance(value, TensorMetadata) and isinstance(value.memory_format, str):
        return value._replace(memory_format=getattr(torch, value.memory_format))
    return value


def _graph_spec(graph: fx.Graph) -> tuple[Any, list[tuple[Any, ...]]]:
    nodes = []
    for n in graph.nodes:
        args = fx.node.map_arg(n.args, lambda a: _Ref(a.name))  # type: ignore[arg-type, return-value]
        kwargs = fx.node.map_arg(n.kwargs, lambda a: _Ref(a.name))  # type: ignore[arg-type, return-value]
        meta = {k: _pack_meta(v) for k, v in n.meta.items()}
        meta = {k: v for k, v in meta.items() if _picklable(v)}
        type_expr = n.type if _picklable(n.type) else None
        nodes.append((n.op, n.name, _pack_target(n.target), args, kwargs, type_expr, meta))
    codegen = graph._codegen if _picklable(graph._codegen) else None
    return codegen, nodes


def _graph_from_spec(spec: tuple[Any, list[tuple[Any, ...]]]) -> fx.Graph:
    codegen, nodes = spec
    graph = fx.Graph()
    if codegen is not None:
        graph._codegen = codegen
    env: dict[str, fx.Node] = {}

    def load(a: Any) -> Any:
        return env[a.name] if isinstance(a, _Ref) else a

    for op, name, target, args, kwargs, type_expr, meta in nodes:
        node = graph.create_node(
            op,
            _unpack_target(target),
            fx.node.map_aggregate(args, load),
            fx.node.map_aggregate(kwargs, load),
            name=name,
            type_expr=type_expr,
        )
        node.meta.update({k: _unpack_meta(v) for k, v in meta.items()})
        env[name] = node
    return graph


def _rebuild(
    cls: type[ApproxModule], state: dict[str, Any], spec: Any, eval_spec: Any = None
) -> ApproxModule:
    module = cls.__new__(cls)
    module.__dict__.update(state)
    module.graph = _graph_from_spec(spec)  # recompiles forward()
    if eval_spec is not None:
        graph_spec, extras, constants = eval_spec
        _attach_eval(module, _graph_from_spec(graph_spec), extras, constants)
    return module


def _registered(root: nn.Module, target: str) -> Any:
    """``target`` followed through registered submodules, parameters and buffers only."""
    obj: Any = root
    for part in target.split("."):
        for table in ("_modules", "_parameters", "_buffers"):
            if part in obj.__dict__.get(table, {}):
                obj = obj.__dict__[table][part]
                break
        else:
            raise AttributeError(target)
    return obj


def _eval_extras(fast: ApproxModule, evaluate: fx.GraphModule, graph: fx.Graph) -> dict[str, Any]:
    """What the eval graph reads that the model's tree lacks (its own constants, guards, bodies).

    ``graph`` is the copy of ``evaluate.graph`` that ``fast`` will run; a nested target the
    model lacks (``layer.const``) is renamed to a root-level one there, so every extra is
    an attribute of the eval module itself and never of a module ``fast`` shares.
    """
    extras: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            target = str(node.target)
            try:
                _registered(fast, target)
            except AttributeError:
                value = _resolve(evaluate, target)
                if "." in target:
                    target = node.target = "_eval_" + target.replace(".", "_")
                extras[target] = value
    return extras


def _attach_eval(
    fast: ApproxModule, graph: fx.Graph, extras: dict[str, Any], constants: tuple[str, ...] | None = None
) -> None:
    """Give ``fast`` the eval graph ``graph``, run over ``fast``'s own module tree and tensors.

    The eval module is a plain ``GraphModule`` holding ``fast``'s very ``_modules``,
    ``_parameters`` and ``_buffers`` dictionaries, so training, ``.to()`` and loading a state
    dict reach it; ``extras`` (root-level attributes only the eval graph reads) are plain
    attributes of it, not registered, so ``state_dict()`` keys stay the model's.
    """
    graph._tracer_cls = None
    attrs = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            target = str(node.target)
            attrs[target] = extras[target] if target in extras else _registered(fast, target)
    evaluate = fx.GraphModule(attrs, graph, f"{type(fast).__name__}Eval")
    for name in ("_modules", *_TENSOR_DICTS):
        evaluate.__dict__[name] = fast.__dict__[name]
    for name, value in extras.items():
        evaluate.__dict__[name] = value
    if constants is None:
        constants = tuple(n for n, v in extras.items() if isinstance(v, torch.Tensor))
    evaluate.__dict__[_CONSTANTS] = constants
    evaluate.__dict__[_EXTRAS] = tuple(extras)
    fast.__dict__[_EVAL] = evaluate
    fast.recompile()  # forward() now switches graphs on self.training


def finalize(gm: fx.GraphModule, model: nn.Module) -> ApproxModule:
    """``gm`` (planned and rewritten, over planning copies) -> the module returned to the user.

    The result runs ``gm``'s graph over :func:`module_view` views of ``model`` that share its
    tensor dictionaries (see the module docstring). Attributes the graph reads that ``model``
    lacks (constants captured while tracing) come from ``gm`` as plain tensors.
    """
    tree = module_view(model, share_dicts=True, hooks=True)
    graph = copy.deepcopy(gm.graph)
    graph._tracer_cls = None
    attrs: dict[str, Any] = {}
    constants: list[str] = []
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            target = str(node.target)
            try:
                attrs[target] = _resolve(tree, target)
            except AttributeError:
                attrs[target] = _resolve(gm, target)
                constants.append(target)
    fast = ApproxModule(attrs, graph, type(model).__name__)
    # GraphModule.__init__ built only what the graph names; take the whole tree instead,
    # so state_dict(), named_modules() and unused submodules match the model.
    fast.__dict__["_modules"] = dict(tree._modules)
    for name in _TENSOR_DICTS:
        fast.__dict__[name] = tree.__dict__[name]
    for name in _HOOK_DICTS:
        fast.__dict__[name] = OrderedDict(model.__dict__.get(name, {}))
    held = []
    for target in constants:
        prefix, _, last = target.rpartition(".")
        owner = _resolve(fast, prefix) if prefix else fast
        # A plain attribute of fast's own module object, never of the user's.
        owner.__dict__[last] = _resolve(gm, target)
        if not prefix and isinstance(owner.__dict__[last], torch.Tensor):
            held.append(last)
    fast.__dict__[_CONSTANTS] = tuple(held)
    fast.meta.update(gm.meta)
    evaluate = gm.__dict__.get("_eval_module")  # a ModeGraphModule's eval graph
    if isinstance(evaluate, fx.GraphModule):
        eval_graph = copy.deepcopy(evaluate.graph)
        _attach_eval(fast, eval_graph, _eval_extras(fast, evaluate, eval_graph))
    fast.train(model.training)
    return fast
