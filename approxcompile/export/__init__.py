"""Export rewritten graphs to ONNX and train them with ONNX Runtime (docs/export.md)."""
