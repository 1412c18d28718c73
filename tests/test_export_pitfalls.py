"""Each measured export pitfall (design.md) has a test here that fails if it comes back."""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import approxcompile
from approxcompile.export import (
    ExportError,
    MissingExtraError,
    OrtTrainer,
    artifacts,
    estimators,
    export_onnx,
    export_training,
    lower_for_export,
)
from tests import models
from tests.ort_harness import Case, export_with_noise, ort_gradients, torch_gradients

HAS_ORT = importlib.util.find_spec("onnxruntime.training") is not None
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="needs the [ort] extra (Python 3.11)")
MLP = Case("mlp", models.mlp, (32, 64))


def _graph(path) -> onnx.GraphProto:
    return onnx.load(str(path)).graph


def test_torchscript_exporter_without_constant_folding(monkeypatch, tmp_path) -> None:
    # The dynamo exporter / constant folding turn weight norms into frozen initializers.
    seen = {}
    real = torch.onnx.export

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", spy)
    _, fast, x, _ = MLP.build()
    export_onnx(fast, (x,), tmp_path / "m.onnx")
    assert seen["dynamo"] is False and seen["do_constant_folding"] is False
    assert seen["training"] == torch.onnx.TrainingMode.TRAINING and seen["opset_version"] == 17


def test_weight_norms_are_computed_live_from_the_weights(tmp_path) -> None:
    model, fast, x, _ = MLP.build()
    graph = _graph(export_onnx(fast, (x,), tmp_path / "m.onnx"))
    floats = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and i.dims}
    assert floats == set(model.state_dict())  # a folded weight norm would be an extra initializer
    for plan in approxcompile.report(fast).sampled:
        weight = f"{plan.name.replace('_', '.')}.weight"
        consumers = {n.op_type for n in graph.node if weight in n.input}
        assert {"Gather", "Mul"} <= consumers, (weight, consumers)  # sampled slices and the score


@needs_ort
def test_scores_and_scales_get_no_gradient(monkeypatch, tmp_path) -> None:
    # no_grad/detach do not survive export; without stop_gradient ORT differentiates through
    # the crs probabilities and scales and its gradients leave PyTorch's.
    _, fast, x, y = Case("mlp", models.mlp, (32, 64), "crs").build()
    art, lowered = export_with_noise(fast, x, tmp_path / "ok", optimizer="sgd")
    noise = lowered.noise_tensors(torch.Generator().manual_seed(1))
    _, want = torch_gradients(lowered.module, x, y, noise)
    _, good = ort_gradients(art, x, y, noise)
    monkeypatch.setattr(estimators, "stop_gradient", lambda t: t)
    leaky, _ = export_with_noise(fast, x, tmp_path / "leaky", optimizer="sgd")
    _, bad = ort_gradients(leaky, x, y, noise)
    worst = max(np.abs(bad[n] - want[n].numpy()).max() for n in want)
    assert worst > 1e-3, "the leak test lost its power"
    assert all(np.allclose(good[n], want[n].numpy(), rtol=1e-4, atol=1e-6) for n in want)


@needs_ort
def test_ort_gradient_is_the_sampled_one_not_the_exact_one(tmp_path) -> None:
    # ORT replaces a custom autograd.Function's backward by the exact gradient; the export twins
    # leave unsampled weight columns with an exactly zero gradient, as the runtime op does.
    _, fast, x, y = MLP.build()
    art = export_training(fast, (x,), tmp_path, optimizer="sgd")
    _, grads = ort_gradients(art, x, y)
    for plan in approxcompile.report(fast).sampled:
        g = grads[f"{plan.name.replace('_', '.')}.weight"]
        zero_columns = int((np.abs(g).sum(0) == 0).sum())
        assert zero_columns == plan.inner - plan.k, plan.name


@needs_ort
def test_bernoulli_draws_from_uniforms_and_trains(tmp_path) -> None:
    # The ONNX Bernoulli op has no gradient builder when its probabilities depend on weights.
    _, fast, x, y = Case("mlp", models.mlp, (32, 64), "bernoulli").build()
    art = export_training(fast, (x,), tmp_path, optimizer="sgd")
    ops = {n.op_type for n in _graph(tmp_path / "model_train.onnx").node}
    assert "Bernoulli" not in ops and {"RandomUniform", "NonZero"} <= ops
    trainer = OrtTrainer(art, lr=0.2, seed=0)
    losses = trainer.fit([(x, y)] * 20, progress=False)
    assert np.isfinite(losses).all()
    # mean of the first and last five losses: 2.22-2.26 -> 1.90-2.00 measured over three seeds
    assert np.mean(losses[-5:]) < 0.95 * np.mean(losses[:5]), losses


def test_eval_export_reads_no_noise(tmp_path) -> None:
    _, fast, x, _ = Case("mlp", models.mlp, (32, 64), "crs").build()
    graph = _graph(export_onnx(fast, (x,), tmp_path / "e.onnx", training=False, noise="input"))
    assert [i.name for i in graph.input] == ["input"]
    assert not {"TopK", "RandomUniform", "CumSum"} & {n.op_type for n in graph.node}


# --- error paths -------------------------------------------------------------------------


class Cummax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return torch.cummax(x, dim=1).values


def test_unexportable_op_is_named_with_its_node(tmp_path) -> None:
    x = torch.randn(16, 64)
    fast = approxcompile.optimize(Cummax(), 0.7, example_inputs=(x,))
    with pytest.raises(ExportError, match=r"at node %cummax .*torch\.cummax.*aten::cummax") as info:
        export_onnx(fast, (x,), tmp_path / "m.onnx")
    assert info.value.__cause__ is not None


def test_missing_extra_says_how_to_install(monkeypatch, tmp_path) -> None:
    real = importlib.import_module

    def no_ort(name, *args):
        if name.startswith("onnxruntime"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(artifacts.importlib, "import_module", no_ort)
    _, fast, x, _ = MLP.build()
    with pytest.raises(MissingExtraError, match=r"pip install 'approxcompile\[ort\]'"):
        export_training(fast, (x,), tmp_path)
    assert not list(tmp_path.iterdir())  # failed before writing anything


def test_unwritable_output_directory(tmp_path) -> None:
    _, fast, x, _ = MLP.build()
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ExportError, match="cannot write to .*a_file/out"):
        export_training(fast, (x,), blocker / "out")
    with pytest.raises(ExportError, match="cannot write .*a_file/m.onnx"):
        export_onnx(fast, (x,), blocker / "m.onnx")


def test_bad_arguments() -> None:
    _, fast, x, _ = MLP.build()
    with pytest.raises(ExportError, match="expects the fx.GraphModule"):
        export_onnx(models.mlp(), (x,), "unused.onnx")
    with pytest.raises(ValueError, match="loss must be one of"):
        export_training(fast, (x,), "unused", loss="hinge")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        export_training(fast, (x,), "unused", optimizer="lion")
    with pytest.raises(ValueError, match="noise must be"):
        lower_for_export(fast, noise="fixed")  # type: ignore[arg-type]
