"""The export package's error type (its own module: ``lower`` and ``estimators`` both raise it)."""

from __future__ import annotations

from approxcompile.errors import ApproxCompileError


class ExportError(ApproxCompileError, RuntimeError):
    """A graph could not be lowered, exported to ONNX or turned into ORT training artifacts."""
