"""``approxcompile export``: artifacts or plain ONNX files on success, one error line on mistakes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from approxcompile.cli import main
from approxcompile.export import Artifacts, ExportError, OrtTrainer
from tests import models

needs_ort = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime.training") is None, reason="needs the [ort] extra"
)


def test_onnx_only_writes_the_two_graphs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "onnx"
    argv = ["export", "tests.models:mlp", "--input-shape", "16,64", "--out", str(out), "--onnx-only"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "product nodes sampled at budget 0.4" in stdout and "model_eval.onnx" in stdout
    assert "stored transposed (W.T) in the training graph: layers.1.weight__t" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["model_eval.onnx", "model_train.onnx"]
    train, exact = (onnx.load(str(out / name)).graph for name in ("model_train.onnx", "model_eval.onnx"))
    assert "TopK" in {n.op_type for n in train.node} and "TopK" not in {n.op_type for n in exact.node}
    assert "layers.1.weight__t" in {i.name for i in train.initializer}
    assert "layers.1.weight" in {i.name for i in exact.initializer}  # the exact model keeps its names


@needs_ort
def test_artifacts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["export", "tests.models:cnn", "--input-shape", "8,1,8,8", "--out", str(tmp_path),
            "--optimizer", "sgd", "--method", "crs"]  # fmt: skip
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    names = {p.name for p in tmp_path.iterdir()}
    assert {"training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint"} <= names
    # every file it writes is listed, and nothing else
    listed = {Path(line[6:]).name for line in out.splitlines() if line.startswith("wrote ")}
    assert listed == names and len(listed) == 7
    # another process picks the directory up: train a step, then bring the weights home
    art = Artifacts.load(tmp_path)
    assert (art.optimizer, art.loss, art.inputs) == ("sgd", "cross_entropy", 1)
    trainer = OrtTrainer(art, lr=0.1)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    assert np.isfinite(trainer.step(x, y))
    model = models.cnn()
    trainer.load_into(model)
    assert not torch.equal(model.conv2.weight, models.cnn().conv2.weight)  # trained weights arrived


def test_artifacts_load_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="artifacts.json"):
        Artifacts.load(tmp_path)


def test_unwritable_out_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("")
    argv = ["export", "tests.models:mlp", "--input-shape", "16,64", "--out", str(tmp_path / "f" / "x"), "-q"]
    assert main(argv) == 2  # -q: no plan warnings, so the error is the only line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("approxcompile: error: ") and "cannot write" in err[0]


def test_out_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "tests.models:mlp", "--input-shape", "16,64"]) == 2
    assert "--out" in capsys.readouterr().err
