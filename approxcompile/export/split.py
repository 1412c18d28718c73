"""One ONNX export, two graphs: cut the switched forward into the training and the eval graph.

``export_split`` (``onnx_export``) exports the lowered module once, with every export twin
computing both of its products and a boolean graph input choosing between them::

    y = Where(approxcompile_sampling, sampled product, exact product)

and this module cuts that graph in two, on the ONNX protobuf, without running the exporter
again::

    training graph: Where(...) -> sampled product   the exact products are pruned
    eval graph:     Where(...) -> exact product     TopK / GatherND / RandomUniform and the
                                                    noise inputs are pruned; Dropout and
                                                    BatchNormalization take their eval form

The eval form is what ONNX Runtime's ``generate_artifacts`` itself does to derive an eval
graph (Dropout loses its ``training_mode`` input, BatchNormalization gets
``training_mode=0``), plus dropping BatchNormalization's running-statistics outputs, which an
eval-mode export does not write. The only mode-dependent ops a training-mode TorchScript
export writes are those two and the twins, so the result computes what an eval-mode export
of the same module computes; a module whose Python code branches on ``self.training`` has
a different eval graph altogether and is not cut here (``artifacts`` exports it separately).
"""

from __future__ import annotations

from typing import Any

SAMPLING = "approxcompile_sampling"  # the boolean graph input of the switched export


def split(model: Any, noise: tuple[str, ...]) -> tuple[Any, Any]:
    """``(training graph, eval graph)`` from a switched export (an ``onnx.ModelProto``).

    ``model`` itself becomes the training graph (one copy of the initializers, not two).
    """
    train, evaluate = model, type(model)()
    evaluate.CopyFrom(model)
    _choose(train.graph, branch=1)
    _choose(evaluate.graph, branch=2)
    _eval_form(evaluate.graph)
    _prune(train.graph, removable=(SAMPLING,))
    _prune(evaluate.graph, removable=(SAMPLING, *noise))
    _trim_batch_norm(evaluate.graph)
    return train, evaluate


def switches(graph: Any) -> int:
    """How many ``Where`` nodes the sampling input drives (one per export twin)."""
    return sum(1 for n in graph.node if n.op_type == "Where" and n.input and n.input[0] == SAMPLING)


def _choose(graph: Any, *, branch: int) -> None:
    """Replace ``Where(sampling, a, b)`` by ``a`` (branch 1) or ``b`` (branch 2) everywhere."""
    renamed: dict[str, str] = {}
    outputs = {o.name for o in graph.output}
    for node in list(graph.node):
        if node.op_type != "Where" or not node.input or node.input[0] != SAMPLING:
            continue
        chosen = renamed.get(node.input[branch], node.input[branch])
        if node.output[0] in outputs:  # the graph output keeps its name: an Identity feeds it
            del node.input[:]
            node.input.append(chosen)
            node.op_type = "Identity"
            del node.attribute[:]
        else:
            renamed[node.output[0]] = chosen
            graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]


def _prune(graph: Any, *, removable: tuple[str, ...]) -> None:
    """Drop the nodes no graph output depends on, then the ``removable`` inputs nothing reads."""
    needed = {o.name for o in graph.output}
    keep: list[int] = []
    nodes = list(graph.node)
    for i in range(len(nodes) - 1, -1, -1):  # ONNX nodes are in topological order
        if any(name in needed for name in nodes[i].output):
            keep.append(i)
            needed.update(_reads(nodes[i]))
    kept = [type(nodes[i])() for i in reversed(keep)]
    for new, i in zip(kept, reversed(keep), strict=True):
        new.CopyFrom(nodes[i])
    del graph.node[:]
    graph.node.extend(kept)
    for value in list(graph.input):
        if value.name in removable and value.name not in needed:
            graph.input.remove(value)


def _eval_form(graph: Any) -> None:
    for node in graph.node:
        if node.op_type == "Dropout" and len(node.input) > 2:
            node.input[2] = ""  # no training_mode: Dropout is the identity
        elif node.op_type == "BatchNormalization":
            for attr in node.attribute:
                if attr.name == "training_mode":
                    attr.i = 0


def _trim_batch_norm(graph: Any) -> None:
    """Eval-mode BatchNormalization writes ``Y`` only: drop running-statistics outputs nothing reads."""
    read = {name for n in graph.node for name in _reads(n)} | {o.name for o in graph.output}
    for node in graph.node:
        if node.op_type == "BatchNormalization" and len(node.output) > 1:
            if not any(name in read for name in node.output[1:]):
                del node.output[1:]


def _reads(node: Any) -> list[str]:
    """The names ``node`` reads, including those its subgraphs (If / Loop bodies) read."""
    names = [name for name in node.input if name]
    for attr in node.attribute:
        for body in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            names.extend(name for inner in body.node for name in _reads(inner))
    return names
