"""Export rewritten graphs to ONNX and train them with ONNX Runtime (docs/export.md).

    path = export_onnx(fast, (x,), "model_train.onnx")             # sampled training graph
    path = export_onnx(fast, (x,), "model_eval.onnx", training=False)  # exact eval graph
    art = export_training(fast, (x,), "artifacts", optimizer="sgd")
    trainer = OrtTrainer(art, lr=0.05)
    trainer.fit(batches)
    trainer.load_into(model)

``onnx`` and ``onnxruntime-training`` come with the optional ``[ort]`` extra; lowering and
``export_onnx`` do not need ONNX Runtime.
"""

from approxcompile.export.artifacts import Artifacts, MissingExtraError, export_training, require_ort
from approxcompile.export.lower import ExportError, Lowered, NoiseInput, lower_for_export
from approxcompile.export.onnx_export import export_onnx
from approxcompile.export.runner import OrtTrainer, load_parameters

__all__ = [
    "Artifacts",
    "ExportError",
    "Lowered",
    "MissingExtraError",
    "NoiseInput",
    "OrtTrainer",
    "export_onnx",
    "export_training",
    "load_parameters",
    "lower_for_export",
    "require_ort",
]
