"""``export_training``: ONNX Runtime training artifacts whose eval graph is exact.

::

    out_dir/training_model.onnx    forward (sampled) + loss + ORT-built gradient graph
    out_dir/eval_model.onnx        forward (exact ops) + loss
    out_dir/optimizer_model.onnx   AdamW or SGD update
    out_dir/checkpoint             the parameters (trainable) and buffers (frozen)
    out_dir/model_train.onnx, model_eval.onnx   the plain exported graphs (export_onnx)
    out_dir/artifacts.json         what OrtTrainer needs to know: inputs, noise, layout, and the
                                   SHA-256 of the four files above (Artifacts.load checks them)

Everything is written into a scratch directory inside ``out_dir`` and moved into place
when all of it succeeded, ``artifacts.json`` last (an older one is removed first), so an
interrupted export never leaves a directory that ``Artifacts.load`` accepts with files of
two exports in it.

``onnxruntime.training.artifacts.generate_artifacts`` derives its eval graph from the graph it
is given, which here samples. So the module is lowered once and exported once
(``export_split``): the one export holds both products of every sampled op, and cutting it
gives the sampled training graph, which goes through ``generate_artifacts``, and the exact
eval graph, from which :func:`eval_model` builds ``eval_model.onnx`` the way
``generate_artifacts`` builds its eval model (forward + loss, parameters as graph inputs,
Dropout / BatchNormalization in eval form) without building a gradient graph for it.
Both graphs name their initializers by ``state_dict()`` key, so they share the checkpoint,
except that sampled linear weights are stored transposed as ``<key>__t`` (``lower_for_export``,
``transpose_weights=True``); ``OrtTrainer.parameters()`` hands them back in the module's layout.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch.fx as fx

from approxcompile.export.lower import ExportError, Noise, NoiseInput, lower_for_export
from approxcompile.export.onnx_export import export_split
from approxcompile.export.quiet import quiet

LOSSES = ("cross_entropy", "mse")
MANIFEST = "artifacts.json"
MANIFEST_FORMAT = 2  # 2: sha256 of every file
OPTIMIZERS = ("adamw", "sgd")
INSTALL_HINT = "pip install 'approxcompile[ort]'"


class MissingExtraError(ExportError, ImportError):
    """onnx / onnxruntime-training are not installed."""


def require_ort() -> tuple[ModuleType, ModuleType]:
    """``(onnx, onnxruntime.training)``, or an error that says how to install them."""
    try:
        onnx = importlib.import_module("onnx")
        training = importlib.import_module("onnxruntime.training")
        importlib.import_module("onnxruntime.training.artifacts")
        importlib.import_module("onnxruntime.training.api")
    except ImportError as e:
        raise MissingExtraError(
            f"ONNX Runtime training is not installed ({e}); run {INSTALL_HINT} "
            "(onnxruntime-training 1.19.2 ships CPython 3.11 wheels only)"
        ) from e
    return onnx, training


@dataclass(frozen=True)
class Artifacts:
    """Paths of one ``export_training`` run, and what the training graph expects as inputs."""

    directory: Path
    training_model: Path
    eval_model: Path
    optimizer_model: Path
    checkpoint: Path
    inputs: int  # model inputs, before the noise inputs and the labels
    noise: tuple[NoiseInput, ...] = ()
    loss: str = "cross_entropy"
    optimizer: str = "adamw"
    transposed: tuple[str, ...] = ()  # checkpoint names holding W.T (see lower_for_export)

    @classmethod
    def in_directory(cls, out: Path, **fields: Any) -> Artifacts:
        """The record of ``out`` with the file names ``generate_artifacts`` writes."""
        return cls(
            directory=out,
            training_model=out / "training_model.onnx",
            eval_model=out / "eval_model.onnx",
            optimizer_model=out / "optimizer_model.onnx",
            checkpoint=out / "checkpoint",
            **fields,
        )

    def manifest(self) -> dict[str, Any]:
        """What ``artifacts.json`` holds: this record, and the SHA-256 of every file it names."""
        return {
            "format": MANIFEST_FORMAT,
            "inputs": self.inputs,
            "noise": [{"name": n.name, "node": n.node, "size": n.size} for n in self.noise],
            "loss": self.loss,
            "optimizer": self.optimizer,
            "transposed": list(self.transposed),
            "sha256": {p.name: _sha256(p) for p in self.files()},
        }

    def files(self) -> tuple[Path, ...]:
        return (self.training_model, self.eval_model, self.optimizer_model, self.checkpoint)

    def save(self) -> Path:
        """Write ``artifacts.json`` (atomically) so :meth:`load` can rebuild and check this record."""
        path = self.directory / MANIFEST
        tmp = path.with_name(f".{MANIFEST}.tmp")
        tmp.write_text(json.dumps(self.manifest(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Artifacts:
        """The record of an ``export_training`` (or ``approxcompile export``) output directory.

        Checks that every file is the one the export wrote (SHA-256), so an interrupted or
        mixed export, or a damaged checkpoint, fails here with a clear error.

        >>> trainer = OrtTrainer(Artifacts.load("artifacts"), lr=0.05)
        """
        out = Path(directory)
        where = out / MANIFEST
        try:
            record = json.loads(where.read_text())
        except (OSError, ValueError) as e:
            raise ExportError(
                f"Artifacts.load: cannot read {where} ({e}); is {out} a directory written by "
                "export_training or `approxcompile export` without --onnx-only?"
            ) from e
        art = _from_record(out, record, where)
        missing = [p.name for p in art.files() if not p.is_file()]
        if missing:
            raise ExportError(f"Artifacts.load: {out} lacks {', '.join(missing)}; export again")
        for p in art.files():
            if _sha256(p) != record["sha256"][p.name]:
                raise ExportError(
                    f"Artifacts.load: {p} is not the file export_training wrote (SHA-256 differs from "
                    f"{where.name}): it was modified, damaged or left by another export; export again"
                )
        return art


_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": int,
    "inputs": int,
    "noise": list,
    "loss": str,
    "optimizer": str,
    "transposed": list,
    "sha256": dict,
}


def _from_record(out: Path, record: Any, where: Path) -> Artifacts:
    """Check the manifest's shape field by field and build the record from it."""

    def bad(what: str) -> ExportError:
        return ExportError(f"Artifacts.load: {where} is not a valid manifest: {what}; export again")

    if not isinstance(record, dict):
        raise bad(f"expected a JSON object, got {type(record).__name__}")
    if record.get("format") != MANIFEST_FORMAT:
        raise bad(f"format {record.get('format')!r}, this version reads format {MANIFEST_FORMAT}")
    for key, kind in _FIELDS.items():
        if key not in record:
            raise bad(f"no {key!r} field")
        if not isinstance(record[key], kind) or isinstance(record[key], bool):
            raise bad(f"{key!r} is a {type(record[key]).__name__}")
    if record["loss"] not in LOSSES or record["optimizer"] not in OPTIMIZERS:
        raise bad(f"unknown loss {record['loss']!r} or optimizer {record['optimizer']!r}")
    try:
        noise = tuple(NoiseInput(**n) for n in record["noise"])
    except TypeError as e:
        raise bad(f"a 'noise' entry is malformed ({e})") from e
    art = Artifacts.in_directory(
        out,
        inputs=record["inputs"],
        noise=noise,
        loss=record["loss"],
        optimizer=record["optimizer"],
        transposed=tuple(str(t) for t in record["transposed"]),
    )
    unhashed = [p.name for p in art.files() if not isinstance(record["sha256"].get(p.name), str)]
    if unhashed:
        raise bad(f"no SHA-256 for {', '.join(unhashed)}")
    return art


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _prepare(out_dir: Path) -> Path:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise ExportError(
            f"export_training: cannot write to {out_dir}: {e.strerror or e}; pass a writable out_dir"
        ) from e
    return out_dir


def _generate(
    graph: Any,
    out: Path,
    *,
    params: list[str],
    frozen: list[str],
    loss: str,
    optimizer: str,
) -> None:
    from onnxruntime.training import artifacts

    loss_type = {"cross_entropy": artifacts.LossType.CrossEntropyLoss, "mse": artifacts.LossType.MSELoss}
    optim = {"adamw": artifacts.OptimType.AdamW, "sgd": artifacts.OptimType.SGD}
    try:
        with quiet():
            artifacts.generate_artifacts(
                graph,
                requires_grad=params,
                frozen_params=frozen,
                loss=loss_type[loss],
                optimizer=optim[optimizer],
                artifact_directory=str(out),
            )
    except Exception as e:  # ORT raises RuntimeError / Fail / InvalidArgument subclasses
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"export_training: generate_artifacts failed on the training graph: {first}") from e


def export_training(
    module: fx.GraphModule,
    example_inputs: Sequence[Any],
    out_dir: str | Path,
    *,
    loss: str = "cross_entropy",
    optimizer: str = "adamw",
    noise: Noise = "draw",
) -> Artifacts:
    """Write ONNX Runtime training artifacts for ``module`` (from ``optimize``) into ``out_dir``.

    Trainable = the parameters with ``requires_grad``; everything else in ``state_dict()``
    (buffers, frozen parameters) is a frozen checkpoint entry.

    >>> art = export_training(fast, (x,), "artifacts", optimizer="sgd")
    >>> OrtTrainer(art, lr=0.1).fit(batches)  # approxcompile.export.runner
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    onnx, _ = require_ort()
    out = _prepare(Path(out_dir))
    # Everything is written to a scratch directory inside out_dir and moved into place only
    # when all of it succeeded, the manifest last: an interrupted export leaves the previous
    # one intact, or no manifest at all, never a mix that Artifacts.load accepts.
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as scratch:
        tmp = Path(scratch)
        art = _write_all(onnx, module, example_inputs, tmp, loss=loss, optimizer=optimizer, noise=noise)
        manifest = art.manifest()  # hashed in the scratch directory, before the move
        (out / MANIFEST).unlink(missing_ok=True)
        for name in (*(p.name for p in art.files()), "model_train.onnx", "model_eval.onnx"):
            os.replace(tmp / name, out / name)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp / MANIFEST, out / MANIFEST)
    return Artifacts.in_directory(out, **_record_fields(art))


def _record_fields(art: Artifacts) -> dict[str, Any]:
    keep = ("inputs", "noise", "loss", "optimizer", "transposed")
    return {k: getattr(art, k) for k in keep}


def _write_all(
    onnx: ModuleType,
    module: fx.GraphModule,
    example_inputs: Sequence[Any],
    out: Path,
    *,
    loss: str,
    optimizer: str,
    noise: Noise,
) -> Artifacts:
    """Export both graphs and generate the ORT artifacts into ``out`` (a scratch directory)."""
    lowered = lower_for_export(module, noise=noise, transpose_weights=True)
    params = [name for name, p in lowered.module.named_parameters() if p.requires_grad]
    frozen = [name for name in lowered.module.state_dict() if name not in params]

    train_graph, exact = export_split(
        lowered, example_inputs, out / "model_train.onnx", out / "model_eval.onnx"
    )
    frozen = _present(exact, frozen)
    _generate(train_graph, out, params=params, frozen=frozen, loss=loss, optimizer=optimizer)
    # generate_artifacts wrote the sampled graph's eval model: the exact one replaces it
    onnx.save(eval_model(exact, params=params, frozen=frozen, loss=loss), str(out / "eval_model.onnx"))
    return Artifacts.in_directory(
        out,
        inputs=len(example_inputs),
        noise=lowered.noise,
        loss=loss,
        optimizer=optimizer,
        transposed=lowered.transposed,
    )


def _present(model: Any, names: list[str]) -> list[str]:
    """The frozen names the graph holds (an unused buffer is not an initializer)."""
    held = {init.name for init in model.graph.initializer}
    return [name for name in names if name in held]


def eval_model(forward: Any, *, params: list[str], frozen: list[str], loss: str) -> Any:
    """ORT's eval model for the forward graph ``forward``, as ``generate_artifacts`` builds it.

    The loss block on the graph's outputs, every parameter and frozen entry moved from an
    initializer to a graph input (the training API feeds them from the checkpoint, in the
    initializers' order) and Dropout / BatchNormalization in eval form; no gradient graph.
    The two steps after the loss are ORT's own helpers, so the result equals the eval model
    ``generate_artifacts`` writes for ``forward`` (a test compares them).
    """
    from onnxruntime.training import onnxblock
    from onnxruntime.training.onnxblock import _training_graph_utils as ort_graph

    blocks = {"cross_entropy": onnxblock.loss.CrossEntropyLoss, "mse": onnxblock.loss.MSELoss}
    loss_block = blocks[loss]()

    class _Eval(onnxblock.ForwardBlock):
        def build(self, *outputs: str) -> Any:
            return loss_block(*outputs)

    block = _Eval()
    with onnxblock.base(forward):
        block(*[output.name for output in forward.graph.output])
    model = block.to_model_proto()
    ort_graph._move_initializers_to_inputs(model, set(params) | set(frozen))
    ort_graph._disable_training_mode(model)
    return model
