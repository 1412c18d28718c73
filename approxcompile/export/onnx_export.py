"""``export_onnx``: the lowered training graph, or the exact eval graph, as an ONNX file.

Exporter settings, each for a reason measured while building the export path:

- the TorchScript exporter (``dynamo=False``): the dynamo exporter constant-folds
  expressions of the weights alone, so a weight's column norms would become a frozen
  initializer and top-k would keep picking by the initial weights;
- ``training=TrainingMode.TRAINING`` and ``do_constant_folding=False`` for the same reason,
  and so that dropout / batch norm export in their training form;
- opset 17, which onnxruntime-training 1.19.2 runs and onnx 1.17.0 writes at IR 8;
- every ``LayerNormalization`` gets its optional ``Mean`` and
  ``InvStdDev`` outputs: the exporter writes only ``Y``, and ORT's gradient builder for
  LayerNormalization reads the other two (without them ``generate_artifacts`` fails with
  ``GradientBuilderBase::O ... i < node_->OutputDefs().size() was false``);
- parameters the exporter deduplicated become initializers again: in eval mode it merges
  equal-valued initializers (two LayerNorms' fresh weights, all ones) into one plus an
  ``Identity`` node, and ``generate_artifacts`` then cannot find the second parameter.

``export_onnx(training=False)`` exports the module in ``eval()`` mode, where every sampled op
is the exact one, so it contains no TopK / random nodes at all. ``export_split`` (what
``export_training`` uses) runs the exporter once for both graphs: each twin computes both
products behind a boolean input and ``split`` cuts the ONNX graph into the sampled training
graph and the exact eval graph.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from approxcompile.export import estimators
from approxcompile.export.lower import TWINS, ExportError, Lowered, Noise, lower_for_export
from approxcompile.export.quiet import quiet
from approxcompile.export.split import SAMPLING, split, switches

OPSET = 17
OUTPUT_NAME = "output"
BATCH = "batch"  # the symbolic leading axis of every model input and of the output
_UNSUPPORTED = re.compile(r"operator '?(?:aten::)?(\w+)'?", re.IGNORECASE)


@contextlib.contextmanager
def _mode(module: torch.nn.Module, training: bool) -> Iterator[None]:
    was = module.training
    module.train(training)
    try:
        yield
    finally:
        module.train(was)


def _culprit(gm: fx.GraphModule, message: str) -> str:
    """The node whose op the exporter named in ``message``, formatted, or '' when none matches."""
    match = _UNSUPPORTED.search(message)
    if match is None:
        return ""
    op = match.group(1).lower()
    for node in gm.graph.nodes:
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if node.op in ("call_function", "call_method") and op in {target.lower(), target.lower() + "_"}:
            return node.format_node()
    return ""


def _check_path(path: Path) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab"):
            pass
    except OSError as e:
        raise ExportError(f"export: cannot write {path}: {e.strerror or e}; choose a writable path") from e
    return path


def _check_inputs(lowered: Lowered, example_inputs: Sequence[Any]) -> None:
    if len(example_inputs) != lowered.model_inputs:
        names = ", ".join(lowered.input_names[: lowered.model_inputs])
        raise ValueError(
            f"export: the graph takes {lowered.model_inputs} input(s) ({names}), "
            f"got {len(example_inputs)} example input(s)"
        )


def _run_exporter(
    gm: fx.GraphModule, args: tuple[Any, ...], f: Any, names: Sequence[str], n_inputs: int, *, training: bool
) -> None:
    """``torch.onnx.export`` with the settings above, into a path or a file object."""
    mode = torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL
    try:
        # quiet(): the TorchScript exporter's deprecation notices, and its IR dump on failure
        with _mode(gm, training), quiet():
            torch.onnx.export(
                gm,
                args,
                f,
                dynamo=False,
                opset_version=OPSET,
                training=mode,
                do_constant_folding=False,
                export_params=True,
                keep_initializers_as_inputs=False,
                input_names=list(names),
                output_names=[OUTPUT_NAME],
                dynamic_axes={name: {0: BATCH} for name in [*names[:n_inputs], OUTPUT_NAME]},
            )
    except Exception as e:  # the exporter raises many types; all mean "this graph does not export"
        culprit = _culprit(gm, str(e))
        where = f" at node {culprit}" if culprit else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(
            f"export: torch.onnx could not export the graph{where}: {first}. Replace the op with "
            "ones ONNX opset 17 has, or register a symbolic (torch.onnx.register_custom_op_symbolic)"
        ) from e


def export_lowered(
    lowered: Lowered, example_inputs: Sequence[Any], path: str | Path, *, training: bool
) -> Path:
    """Export an already lowered module (``lower_for_export``) to ``path``; returns the path."""
    path = _check_path(Path(path))
    if lowered.noise and not training:
        raise ValueError("the eval graph is exact and reads no noise: lower it with noise='draw'")
    _check_inputs(lowered, example_inputs)
    args = tuple(example_inputs) + lowered.noise_tensors()
    gm = lowered.module
    _run_exporter(gm, args, str(path), lowered.input_names, lowered.model_inputs, training=training)
    _prepare_for_ort(path, list(gm.state_dict()))
    return path


def _switched(twin: str, sampling: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The export twin ``twin``'s sampled product where ``sampling`` holds, its exact one elsewhere.

    Exports as ``Where(approxcompile_sampling, sampled, exact)``, where ``split`` cuts.
    """
    kwargs.pop("training", None)
    fn = getattr(estimators, twin)
    return torch.where(sampling, fn(*args, **kwargs, training=True), fn(*args, **kwargs, training=False))


def _switchable(lowered: Lowered) -> tuple[fx.GraphModule, int]:
    """A copy of the lowered module whose twins compute both products (``_switched``)."""
    graph = copy.deepcopy(lowered.module.graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1] if placeholders else None):
        flag = graph.placeholder(SAMPLING)
    twins = set(TWINS.values())
    count = 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target in twins:
            node.args = (node.target.__name__, flag, *node.args)
            node.target = _switched
            count += 1
    gm = fx.GraphModule(lowered.module, graph, class_name="ExportModule")
    gm.meta.update(lowered.module.meta)
    return gm, count


def export_split(
    lowered: Lowered, example_inputs: Sequence[Any], train_path: str | Path, eval_path: str | Path
) -> tuple[Any, Any]:
    """Run the exporter once; write the sampled training graph and the exact eval graph.

    Both read the lowered module's parameters under the same names and in the same order
    (one export), so they share one checkpoint; the eval graph has no noise inputs.
    Returns the two ``onnx.ModelProto`` as written, so callers need not read them back.
    """
    train_path, eval_path = _check_path(Path(train_path)), _check_path(Path(eval_path))
    _check_inputs(lowered, example_inputs)
    onnx = _onnx()
    if onnx is None:
        raise ExportError("export_split needs the onnx package; run pip install 'approxcompile[ort]'")
    gm, count = _switchable(lowered)
    args = (*example_inputs, *lowered.noise_tensors(), torch.tensor(True))
    buffer = io.BytesIO()
    names = [*lowered.input_names, SAMPLING]
    _run_exporter(gm, args, buffer, names, lowered.model_inputs, training=True)
    model = onnx.load_from_string(buffer.getvalue())
    found = switches(model.graph)
    if found != count:
        raise ExportError(
            f"export_split: {count} sampled op(s) should each export one Where on {SAMPLING!r}, "
            f"found {found}; export the two graphs separately with export_onnx"
        )
    state = list(lowered.module.state_dict())
    parts = split(model, tuple(s.name for s in lowered.noise))
    for part, path in zip(parts, (train_path, eval_path), strict=True):
        _prepare_model(onnx, part, state)
        onnx.save(part, str(path))
    return parts


def _prepare_for_ort(path: Path, state: list[str]) -> None:
    """In place: undo initializer deduplication; give LayerNorms their statistics outputs.

    ``generate_artifacts`` builds a gradient graph for the eval graph too, so both need them.
    Only an ``Identity`` whose output is named by a ``state_dict()`` key (``state``) is a
    merged initializer; any other one is left alone (it may carry a weight's gradient).
    The initializers are then put in ``state`` order again: ORT's training API feeds the eval
    graph's parameters in the training graph's order, which follows ``state_dict()``.
    """
    onnx = _onnx()
    data = path.read_bytes()
    if onnx is None or (b"Identity" not in data and b"LayerNormalization" not in data):
        return
    model = onnx.load_from_string(data)  # the bytes just read: no second read of a large file
    if _prepare_model(onnx, model, state):
        onnx.save(model, str(path))


def _prepare_model(onnx: Any, model: Any, state: list[str]) -> bool:
    """``_prepare_for_ort`` on a loaded ``ModelProto``; returns whether it changed anything."""
    graph = model.graph
    patched = 0
    for node in graph.node:
        if node.op_type == "LayerNormalization" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            node.output.extend([f"{node.output[0]}_mean", f"{node.output[0]}_inv_std_dev"])
            patched += 1
    held = {init.name: init for init in graph.initializer}
    rank = {name: i for i, name in enumerate(state)}
    restored = 0
    for node in list(graph.node):
        merged = node.output[0] in rank and node.output[0] not in held
        if node.op_type == "Identity" and node.input[0] in held and merged:
            clone = onnx.TensorProto()
            clone.CopyFrom(held[node.input[0]])
            clone.name = node.output[0]
            graph.initializer.append(clone)
            held[clone.name] = clone
            graph.node.remove(node)
            restored += 1
    if restored:  # the copies went to the end: back into state_dict() order
        ordered = sorted(graph.initializer, key=lambda init: rank.get(init.name, len(rank)))
        kept = [onnx.TensorProto() for _ in ordered]
        for new, old in zip(kept, ordered, strict=True):
            new.CopyFrom(old)
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return bool(patched or restored)


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:  # export_onnx works without the [ort] extra; ORT, which needs this, has it
        return None
    return onnx


def export_onnx(
    module: fx.GraphModule,
    example_inputs: Sequence[Any],
    path: str | Path,
    *,
    training: bool = True,
    noise: Noise = "draw",
) -> Path:
    """Write ``module``'s training graph (sampled) or, with ``training=False``, its exact eval graph.

    ``module`` is a GraphModule from ``approxcompile.optimize``; it is neither mutated nor
    left in another train/eval mode. ``noise="input"`` adds one graph input per random
    node to the training graph (see ``lower_for_export``); the eval graph has none. The
    training graph stores each sampled linear's weight transposed, as ``<key>__t`` (the
    layout ONNX Runtime trains fastest); the eval graph keeps every ``state_dict()`` name.

    >>> export_onnx(fast, (x,), "model_train.onnx")
    >>> export_onnx(fast, (x,), "model_eval.onnx", training=False)
    """
    lowered = lower_for_export(module, noise=noise if training else "draw", transpose_weights=training)
    return export_lowered(lowered, example_inputs, path, training=training)
