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

The eval graph is exported from the module in ``eval()`` mode, where every sampled op is
the exact one, so it contains no TopK / random nodes at all.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from approxcompile.export.lower import ExportError, Lowered, Noise, lower_for_export
from approxcompile.export.quiet import quiet

OPSET = 17
INPUT_NAMES = "input"
OUTPUT_NAME = "output"
BATCH = "batch"  # the symbolic leading axis of every model input and of the output
_UNSUPPORTED = re.compile(r"operator '?(?:aten::)?(\w+)'?", re.IGNORECASE)


def input_names(n_inputs: int, lowered: Lowered) -> list[str]:
    """``input`` (one input) or ``input0, input1, ...``, then the noise inputs."""
    names = [INPUT_NAMES] if n_inputs == 1 else [f"{INPUT_NAMES}{i}" for i in range(n_inputs)]
    return names + [spec.name for spec in lowered.noise]


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


def export_lowered(
    lowered: Lowered, example_inputs: Sequence[Any], path: str | Path, *, training: bool
) -> Path:
    """Export an already lowered module (``lower_for_export``) to ``path``; returns the path."""
    path = _check_path(Path(path))
    gm = lowered.module
    if lowered.noise and not training:
        raise ValueError("the eval graph is exact and reads no noise: lower it with noise='draw'")
    args = tuple(example_inputs) + lowered.noise_tensors()
    names = input_names(len(example_inputs), lowered)
    mode = torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL
    try:
        # quiet(): the TorchScript exporter's deprecation notices, and its IR dump on failure
        with _mode(gm, training), quiet():
            torch.onnx.export(
                gm,
                args,
                str(path),
                dynamo=False,
                opset_version=OPSET,
                training=mode,
                do_constant_folding=False,
                export_params=True,
                keep_initializers_as_inputs=False,
                input_names=names,
                output_names=[OUTPUT_NAME],
                dynamic_axes={name: {0: BATCH} for name in [*names[: len(example_inputs)], OUTPUT_NAME]},
            )
    except Exception as e:  # the exporter raises many types; all mean "this graph does not export"
        culprit = _culprit(gm, str(e))
        where = f" at node {culprit}" if culprit else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(
            f"export: torch.onnx could not export the graph{where}: {first}. Replace the op with "
            "ones ONNX opset 17 has, or register a symbolic (torch.onnx.register_custom_op_symbolic)"
        ) from e
    _prepare_for_ort(path, list(gm.state_dict()))
    return path


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
            copy = onnx.TensorProto()
            copy.CopyFrom(held[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
            held[copy.name] = copy
            graph.node.remove(node)
            restored += 1
    if restored:  # the copies went to the end: back into state_dict() order
        ordered = sorted(graph.initializer, key=lambda init: rank.get(init.name, len(rank)))
        kept = [onnx.TensorProto() for _ in ordered]
        for new, old in zip(kept, ordered, strict=True):
            new.CopyFrom(old)
        del graph.initializer[:]
        graph.initializer.extend(kept)
    if patched or restored:
        onnx.save(model, str(path))


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
