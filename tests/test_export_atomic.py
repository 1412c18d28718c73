"""export_training is all or nothing; Artifacts.load refuses what the export did not write (issue 13)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import approxcompile
from approxcompile.export import artifacts as artifacts_module
from approxcompile.export.artifacts import MANIFEST, Artifacts, export_training
from approxcompile.export.lower import ExportError
from tests.models import MLP

needs_ort = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime.training") is None, reason="needs the [ort] extra"
)
X = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))


def _fast(budget: float) -> approxcompile.module.ApproxModule:
    torch.manual_seed(0)
    return approxcompile.optimize(MLP((32, 64, 64, 64, 8)), budget, example_inputs=(X,))


def _contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@needs_ort
def test_an_export_interrupted_part_way_leaves_the_previous_one_intact(tmp_path: Path, monkeypatch) -> None:
    export_training(_fast(0.6), (X,), tmp_path, optimizer="sgd")
    before = _contents(tmp_path)
    calls = []

    def interrupted(*args, **kwargs):  # the exact eval model, built after generate_artifacts, never is
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(artifacts_module, "eval_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_training(_fast(0.8), (X,), tmp_path, optimizer="adamw")
    assert calls == [1]
    # Before: new training graph and checkpoint, a sampled eval graph, the old manifest.
    assert _contents(tmp_path) == before
    assert Artifacts.load(tmp_path).optimizer == "sgd"


@needs_ort
def test_a_failing_export_into_a_new_directory_leaves_no_partial_files(tmp_path: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise ExportError("export_training: generate_artifacts failed")

    monkeypatch.setattr(artifacts_module, "_generate", broken)
    with pytest.raises(ExportError):
        export_training(_fast(0.6), (X,), tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []  # a 0-byte model_train.onnx before


@needs_ort
def test_load_checks_every_file_against_the_manifest_hash(tmp_path: Path) -> None:
    art = export_training(_fast(0.6), (X,), tmp_path, optimizer="sgd")
    assert Artifacts.load(tmp_path) == art
    data = bytearray(art.checkpoint.read_bytes())
    data[len(data) // 2] ^= 0xFF
    art.checkpoint.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"checkpoint is not the file export_training wrote \(SHA-256"):
        Artifacts.load(tmp_path)
    # ORT itself loads a flipped weight happily; a truncated checkpoint it refuses, and a record
    # built by hand skips the hash check: ORT's pages of detail come back as one line.
    art.checkpoint.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ExportError, match="ONNX Runtime cannot load") as info:
        approxcompile.OrtTrainer(art)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "manifest, match",
    [
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"format": 2}', "no 'inputs' field"),
        ('{"format": 1}', "format 1"),
        ("{", "cannot read"),
    ],
)
def test_load_names_what_is_wrong_with_a_bad_manifest(tmp_path: Path, manifest: str, match: str) -> None:
    (tmp_path / MANIFEST).write_text(manifest)
    with pytest.raises(ExportError, match=match):  # KeyError / AttributeError before
        Artifacts.load(tmp_path)


def test_load_refuses_a_manifest_with_a_field_of_the_wrong_type(tmp_path: Path) -> None:
    record = {"format": 2, "inputs": "1", "noise": [], "loss": "mse", "optimizer": "sgd", "transposed": []}
    (tmp_path / MANIFEST).write_text(json.dumps({**record, "sha256": {}}))
    with pytest.raises(ExportError, match="'inputs' is a str"):
        Artifacts.load(tmp_path)
