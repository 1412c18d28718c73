"""Lower for export: swap each runtime sampled op for its exportable twin, on a copy.

::

    sampled_linear(x, W, b, keep=0.4, method='topk', training=training)
        -> export_linear(x, W, b, keep=0.4, method='topk', training=training)
    sampled_conv(x, W, b, s, p, d, keep=0.3, method='crs', training=training)
        -> export_conv(x, W, b, s, p, d, keep=0.3, method='crs', training=training, noise=noise_conv2)

The input module is not mutated: the result is a new ``GraphModule`` over a copy of the
graph that shares the input's submodules and parameters, so ``state_dict()`` keys and
tensors are the same objects (except with ``transpose_weights``, below). With
``noise="input"`` every random node reads its uniform draws from a new graph input
(``noise_<node>``, listed in :attr:`Lowered.noise`) instead of drawing them, which lets
PyTorch and ONNX Runtime run on the same randomness.

With ``transpose_weights=True`` (what ``export_training`` uses) each sampled linear's weight
becomes a new parameter ``<name>__t`` holding ``W.T``, ``(in, out)``, so the kept columns of
``W`` are leading-axis rows (see ``estimators``: ONNX Runtime scatters their gradient
an order of magnitude faster). Those parameters are copies, not the input's tensors; the
names are in :attr:`Lowered.transposed`, and :func:`restore_layout` maps values back.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx

from approxcompile import kinds, ops
from approxcompile.errors import ApproxCompileError
from approxcompile.export import estimators
from approxcompile.plan import META_KEY, kept_count

Noise = Literal["draw", "input"]
TRANSPOSED_SUFFIX = "__t"
INPUT_NAME = "input"  # the ONNX name of a single model input; several are input0, input1, ...


# runtime op -> its exportable twin, for every kind that has one
TWINS: dict[Callable[..., Any], Callable[..., Any]] = {
    kind.forward_op: getattr(estimators, kind.export_twin)
    for kind in kinds.KINDS.values()
    if kind.export_twin is not None
}
_RUNTIME_OPS = kinds.runtime_ops()


class ExportError(ApproxCompileError, RuntimeError):
    """A graph could not be lowered, exported to ONNX or turned into ORT training artifacts."""


@dataclass(frozen=True)
class NoiseInput:
    """One fed-in noise input: graph input ``name`` takes ``size`` uniform draws in [0, 1)."""

    name: str
    node: str
    size: int


@dataclass(frozen=True)
class Lowered:
    """The export-ready module, how many ops were swapped, its graph inputs and the noise it reads.

    ``input_names`` names every graph input in order, as the ONNX graph will: the model's
    inputs (``input``, or ``input0, input1, ...``), then the noise inputs.
    """

    module: fx.GraphModule
    swapped: int
    noise: tuple[NoiseInput, ...] = ()
    transposed: tuple[str, ...] = ()  # parameters stored as W.T, named <state_dict key>__t
    input_names: tuple[str, ...] = (INPUT_NAME,)

    @property
    def model_inputs(self) -> int:
        """How many graph inputs the model's own inputs take (the rest are noise)."""
        return len(self.input_names) - len(self.noise)

    def noise_tensors(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        """Fresh uniform draws for every noise input, in graph-input order."""
        return tuple(torch.rand(spec.size, generator=generator) for spec in self.noise)


def _noise_size(node: fx.Node) -> int:
    plan = node.meta.get(META_KEY)
    if plan is None:
        raise ExportError(
            f"lower_for_export: {node.format_node()} has no plan in node.meta[{META_KEY!r}], so its "
            "noise size is unknown; export a module returned by approxcompile.optimize"
        )
    keep, method = node.kwargs["keep"], node.kwargs.get("method", "topk")
    assert isinstance(keep, (int, float)) and isinstance(method, str), node.format_node()
    k = kept_count(keep, plan.inner)
    # keep=1.0 calls (exact convs, measured exact nodes) run the exact op and draw nothing.
    return 0 if k >= plan.inner else estimators.noise_size(method, plan.inner, k)


def _check_exportable(node: fx.Node) -> None:
    """Refuse what the export backend does not run: backward sampling, weight-only scores."""
    found = _RUNTIME_OPS.get(node.target) if node.op == "call_function" else None  # type: ignore[arg-type]
    if found is None:
        return
    kind, mode = found
    support = kind.support("export")
    if mode == "backward" and mode not in support.modes:
        raise ExportError(
            f"lower_for_export: {node.format_node()} samples in backward mode, which does not export "
            "(ONNX Runtime builds its own exact gradient); optimize with ApproxConfig(mode='forward')"
        )
    if mode not in support.modes:
        raise ExportError(
            f"lower_for_export: {node.format_node()} is a {kind.name} op, which has no export twin; "
            f"leave it exact with ApproxConfig().set_op_type({kind.op_type!r}, NodeOverride(exact=True))"
        )
    if node.kwargs.get("scores", "activations") not in support.scores:
        raise ExportError(
            f"lower_for_export: {node.format_node()} uses scores='weights', which has no export twin "
            "yet; optimize with ApproxConfig(scores='activations') for export"
        )


def restore_layout(name: str, value: Any, transposed: Sequence[str]) -> tuple[str, Any]:
    """``(state_dict key, value in the module's layout)`` for a lowered parameter ``name``."""
    if name not in transposed:
        return name, value
    return name.removesuffix(TRANSPOSED_SUFFIX), value.T


def _transposable(graph: fx.Graph, module: fx.GraphModule) -> list[fx.Node]:
    """The weight ``get_attr`` nodes read only as the weight of sampled linears, and nowhere else.

    A weight that is tied to another name, read by a ``call_module`` or by any other node
    keeps its layout: a transposed copy would untie it. So does one whose ``<name>__t`` the
    graph already reads.
    """
    names: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        names[id(p)] = names.get(id(p), 0) + 1
    modules = [str(n.target) for n in graph.nodes if n.op == "call_module"]
    reads: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "get_attr":
            reads[str(n.target)] = reads.get(str(n.target), 0) + 1
    found = []
    for node in graph.nodes:
        if node.op != "get_attr" or reads[str(node.target)] != 1 or not node.users:
            continue
        target = str(node.target)
        try:
            param = module.get_parameter(target)
        except AttributeError:
            continue  # a buffer or a plain attribute
        uses_ok = all(
            u.op == "call_function"
            and u.target in (estimators.export_linear, ops.sampled_linear)
            and len(u.args) > 1
            and u.args[1] is node
            and node not in (u.args[0], *u.args[2:])
            for u in node.users
        )
        if (
            uses_ok
            and param.dim() == 2
            and names.get(id(param)) == 1
            and not any(target.startswith(m + ".") for m in modules)
            and target + TRANSPOSED_SUFFIX not in reads
        ):
            found.append(node)
    return found


def transposed_weights(module: fx.GraphModule) -> tuple[str, ...]:
    """The names ``lower_for_export(module, transpose_weights=True)`` gives transposed weights."""
    return tuple(f"{node.target}{TRANSPOSED_SUFFIX}" for node in _transposable(module.graph, module))


def _transpose_weights(lowered: fx.GraphModule, module: fx.GraphModule) -> tuple[str, ...]:
    names = []
    for node in _transposable(lowered.graph, module):
        target = str(node.target)
        prefix, _, field = target.rpartition(".")
        container = lowered.get_submodule(prefix)
        assert prefix == "" or container is not module.get_submodule(prefix), target  # a fresh holder
        new = field + TRANSPOSED_SUFFIX
        assert not hasattr(container, new), target  # _transposable left out taken names
        weight = module.get_parameter(target)
        delattr(container, field)
        container.register_parameter(
            new, torch.nn.Parameter(weight.detach().t().contiguous(), requires_grad=weight.requires_grad)
        )
        node.target = f"{prefix}.{new}" if prefix else new
        for user in list(node.users):
            user.kwargs = {**user.kwargs, "transposed": True}
        names.append(str(node.target))
    if names:
        lowered.recompile()
    return tuple(names)


def lower_for_export(
    module: fx.GraphModule, *, noise: Noise = "draw", transpose_weights: bool = False
) -> Lowered:
    """Return a copy of ``module`` whose sampled ops are export-friendly (``module`` is unchanged)."""
    if not isinstance(module, fx.GraphModule):
        raise ExportError(
            "export expects the fx.GraphModule returned by approxcompile.optimize, "
            f"got {type(module).__name__}"
        )
    if noise not in ("draw", "input"):
        raise ValueError(f"noise must be 'draw' or 'input', got {noise!r}")
    if getattr(module, "eval_graph", None) is not None:
        # Both ONNX graphs come from the one training graph (export_split); this module's eval
        # graph is another graph, which that would silently replace by the training branch.
        raise ExportError(
            f"lower_for_export: {type(module).__name__}'s forward branches on self.training, so its "
            "eval graph differs from its training graph, and export writes both from the training "
            "graph; move the mode-dependent code into ops that take a training flag "
            "(F.dropout(x, p, training=self.training)) so one graph serves both modes"
        )
    graph = copy.deepcopy(module.graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    inputs = len(placeholders)
    specs: list[NoiseInput] = []
    swapped = 0
    for node in list(graph.nodes):
        _check_exportable(node)
        twin = TWINS.get(node.target) if node.op == "call_function" else None
        if twin is None:
            continue
        node.target = twin
        # Runtime-only keywords: the exported graph recomputes the weight norms every step (it
        # keeps no state across runs), and live= only steers the runtime conv's compiled backward.
        node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("weight_norms_every", "live")}
        swapped += 1
        size = _noise_size(node) if noise == "input" else 0
        if size:
            name = f"noise_{node.name}"
            with graph.inserting_after(placeholders[-1] if placeholders else None):
                placeholders.append(graph.placeholder(name))
            node.kwargs = {**node.kwargs, "noise": placeholders[-1]}
            specs.append(NoiseInput(name=name, node=node.name, size=size))
    graph.lint()
    lowered = fx.GraphModule(module, graph, class_name="ExportModule")
    lowered.meta.update(module.meta)
    lowered.train(module.training)
    transposed = _transpose_weights(lowered, module) if transpose_weights else ()
    names = [INPUT_NAME] if inputs == 1 else [f"{INPUT_NAME}{i}" for i in range(inputs)]
    return Lowered(
        module=lowered,
        swapped=swapped,
        noise=tuple(specs),
        transposed=transposed,
        input_names=(*names, *(spec.name for spec in specs)),
    )
