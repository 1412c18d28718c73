"""Smoke runs of the ONNX Runtime tools (tools/bench_ort.py, tools/ort_train.py); no timing asserted."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.test_bench import _tool

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime.training") is None, reason="needs the [ort] extra"
)


def test_bench_ort_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ort.json"
    argv = ["--models", "mlp", "cnn", "--size", "quick", "--steps", "2", "--warmup", "1", "--json", str(out)]
    assert _tool("bench_ort").main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"].split(":")[0] for r in rows] == ["mlp", "cnn"]
    assert all(r["sampled_nodes"] > 0 and r["exact_ms"] > 0 and r["approx_ms"] > 0 for r in rows)
    assert "| speedup |" in capsys.readouterr().out


@pytest.mark.slow
def test_ort_train_learns_digits_and_round_trips(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    argv = ["--data", "mnist_5k", "--models", "mlp", "--epochs", "1", "--json", str(out)]
    assert _tool("ort_train").main(argv) == 0
    exact, sampled = json.loads(out.read_text())
    assert (exact["engine"], exact["sampled_nodes"], exact["variant"]) == ("ort", 0, "exact")
    assert sampled["sampled_nodes"] > 0
    # accuracy is measured in PyTorch after load_into: it is only above chance if the ORT-trained
    # weights came back (63 AdamW steps on 4000 digits)
    assert exact["test_accuracy"] > 0.5 and sampled["test_accuracy"] > 0.3, (exact, sampled)
