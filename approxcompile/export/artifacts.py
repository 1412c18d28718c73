"""``export_training``: ONNX Runtime training artifacts whose eval graph is exact.

::

    out_dir/training_model.onnx    forward (sampled) + loss + ORT-built gradient graph
    out_dir/eval_model.onnx        forward (exact ops) + loss
    out_dir/optimizer_model.onnx   AdamW or SGD update
    out_dir/checkpoint             the parameters (trainable) and buffers (frozen)
    out_dir/model_train.onnx, model_eval.onnx   the plain exported graphs (export_onnx)
    out_dir/artifacts.json         what OrtTrainer needs to know: inputs, noise, layout (Artifacts.load)

``onnxruntime.training.artifacts.generate_artifacts`` derives its eval graph from the graph it
is given, which here samples; the exact eval graph is therefore exported separately and
passed through ``generate_artifacts`` too, and its ``eval_model.onnx`` replaces the sampled
one. Both graphs name their initializers by ``state_dict()`` key, so they share the checkpoint,
except that sampled linear weights are stored transposed as ``<key>__t`` (``lower_for_export``,
``transpose_weights=True``); ``OrtTrainer.parameters()`` hands them back in the module's layout.
"""

from __future__ import annotations

import importlib
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch.fx as fx

from approxcompile.export.lower import ExportError, Noise, NoiseInput, lower_for_export
from approxcompile.export.onnx_export import export_lowered
from approxcompile.export.quiet import quiet

LOSSES = ("cross_entropy", "mse")
MANIFEST = "artifacts.json"
MANIFEST_FORMAT = 1
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

    def save(self) -> Path:
        """Write ``artifacts.json`` into the directory, so :meth:`load` can rebuild this record."""
        record = {
            "format": MANIFEST_FORMAT,
            "inputs": self.inputs,
            "noise": [{"name": n.name, "node": n.node, "size": n.size} for n in self.noise],
            "loss": self.loss,
            "optimizer": self.optimizer,
            "transposed": list(self.transposed),
        }
        path = self.directory / MANIFEST
        path.write_text(json.dumps(record, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Artifacts:
        """The record of an ``export_training`` (or ``approxcompile export``) output directory.

        >>> trainer = OrtTrainer(Artifacts.load("artifacts"), lr=0.05)
        """
        out = Path(directory)
        try:
            record = json.loads((out / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise ExportError(
                f"Artifacts.load: cannot read {out / MANIFEST} ({e}); is {out} a directory written by "
                "export_training or `approxcompile export` without --onnx-only?"
            ) from e
        if record.get("format") != MANIFEST_FORMAT:
            raise ExportError(f"Artifacts.load: {out / MANIFEST} has format {record.get('format')!r}")
        art = cls.in_directory(
            out,
            inputs=int(record["inputs"]),
            noise=tuple(NoiseInput(**n) for n in record["noise"]),
            loss=record["loss"],
            optimizer=record["optimizer"],
            transposed=tuple(record["transposed"]),
        )
        missing = [p.name for p in (art.training_model, art.eval_model, art.optimizer_model, art.checkpoint)]
        missing = [name for name in missing if not (out / name).exists()]
        if missing:
            raise ExportError(f"Artifacts.load: {out} lacks {', '.join(missing)}")
        return art


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
    onnx: ModuleType,
    graph: Path,
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
                onnx.load(str(graph)),
                requires_grad=params,
                frozen_params=frozen,
                loss=loss_type[loss],
                optimizer=optim[optimizer],
                artifact_directory=str(out),
            )
    except Exception as e:  # ORT raises RuntimeError / Fail / InvalidArgument subclasses
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"export_training: generate_artifacts failed on {graph.name}: {first}") from e


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
    lowered = lower_for_export(module, noise=noise, transpose_weights=True)
    params = [name for name, p in lowered.module.named_parameters() if p.requires_grad]
    frozen = [name for name in lowered.module.state_dict() if name not in params]

    train_graph = export_lowered(lowered, example_inputs, out / "model_train.onnx", training=True)
    exact = lower_for_export(module, transpose_weights=True) if lowered.noise else lowered
    eval_graph = export_lowered(exact, example_inputs, out / "model_eval.onnx", training=False)
    kw: dict[str, Any] = {"params": params, "frozen": _present(onnx, eval_graph, frozen), "loss": loss}
    _generate(onnx, train_graph, out, optimizer=optimizer, **kw)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        _generate(onnx, eval_graph, Path(tmp), optimizer=optimizer, **kw)
        shutil.copyfile(Path(tmp) / "eval_model.onnx", out / "eval_model.onnx")
    art = Artifacts.in_directory(
        out,
        inputs=len(example_inputs),
        noise=lowered.noise,
        loss=loss,
        optimizer=optimizer,
        transposed=lowered.transposed,
    )
    art.save()
    return art


def _present(onnx: ModuleType, graph: Path, names: list[str]) -> list[str]:
    """The frozen names the graph holds (an unused buffer is not an initializer)."""
    held = {init.name for init in onnx.load(str(graph)).graph.initializer}
    return [name for name in names if name in held]
