"""Export to ONNX and ONNX Runtime training: gradients, SGD parity, exact eval, round trip."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from approxcompile import ops
from approxcompile.export import (
    Artifacts,
    OrtTrainer,
    estimators,
    export_onnx,
    export_training,
    load_parameters,
    lower_for_export,
)
from tests import models
from tests.ort_harness import Case, export_with_noise, ort_gradients, sgd_torch, snapshot, torch_gradients

HAS_ORT = importlib.util.find_spec("onnxruntime.training") is not None
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="needs the [ort] extra (Python 3.11)")

MLP = Case("mlp", models.mlp, (32, 64))
CNN = Case("cnn", models.cnn, (8, 1, 8, 8))
ENCODER = Case("encoder", models.encoder, (4, 16, 32))  # LayerNorms, attention matmuls
METHODS = ("topk", "uniform", "crs", "bernoulli", "wta_crs")


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_lowering_swaps_every_sampled_op_on_a_copy() -> None:
    model, fast, x, _ = CNN.build()
    code_before = fast.code
    lowered = lower_for_export(fast)
    targets = [n.target for n in lowered.module.graph.nodes if n.op == "call_function"]
    sampled = sum(n.target in ops.SAMPLED_OPS for n in fast.graph.nodes)
    assert lowered.swapped == sampled > 0
    assert not set(targets) & set(ops.SAMPLED_OPS)
    assert sum(t in estimators.__dict__.values() for t in targets) == sampled
    assert fast.code == code_before  # the input is not mutated
    shared = {k: v.data_ptr() for k, v in fast.state_dict().items()}
    assert {k: v.data_ptr() for k, v in lowered.module.state_dict().items()} == shared


@pytest.mark.parametrize("case", [MLP, CNN], ids=lambda c: c.name)
def test_lowered_topk_equals_the_runtime_op(case: Case) -> None:
    # eager model (exact) vs rewritten module (runtime kernels) vs lowered module (export twins)
    model, fast, x, y = case.build()
    lowered = lower_for_export(fast).module
    loss_rt, grads_rt = torch_gradients(fast, x, y)
    loss_lo, grads_lo = torch_gradients(lowered, x, y)
    loss_exact, _ = torch_gradients(model, x, y)
    assert loss_lo == pytest.approx(loss_rt, rel=1e-6)
    assert loss_lo != pytest.approx(loss_exact, rel=1e-6)  # the sampling really happens
    for name, g in grads_rt.items():
        torch.testing.assert_close(grads_lo[name], g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ("uniform", "crs", "bernoulli", "wta_crs"))
def test_lowered_random_methods_are_unbiased(method: str) -> None:
    # The export twins draw differently from the runtime op; they must estimate the same product.
    torch.manual_seed(0)
    x, w = torch.randn(16, 64), torch.randn(32, 64)
    draws = torch.stack([estimators.export_linear(x, w, keep=0.25, method=method) for _ in range(3000)])
    exact = x @ w.t()
    err = (draws.mean(0) - exact).norm() / exact.norm()
    assert err < 0.05, f"{method}: relative error of the mean of 3000 draws {err:.3f}"  # ~0.02 measured


def test_stop_gradient_is_exact_and_has_no_gradient() -> None:
    exponents = torch.arange(-120, 120, 3, dtype=torch.float32)
    v = torch.rand(exponents.numel()) * 2.0**exponents
    v = torch.cat([v, torch.tensor([0.0, 1.0, 2.0**-126, 3.4e38, 1 / 3])]).requires_grad_()
    out = estimators.stop_gradient(v)
    assert torch.equal(out, v.detach())
    assert not out.requires_grad


@needs_ort
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", [MLP, CNN, ENCODER], ids=lambda c: c.name)
def test_training_graph_gradients_equal_pytorch(case: Case, method: str, tmp_path) -> None:
    _, fast, x, y = Case(case.name, case.factory, case.shape, method).build()
    art, lowered = export_with_noise(fast, x, tmp_path, optimizer="sgd")
    assert (len(art.noise) > 0) == (method != "topk")
    noise = lowered.noise_tensors(torch.Generator().manual_seed(1))
    loss_pt, grads_pt = torch_gradients(lowered.module, x, y, noise)
    loss_ort, grads_ort = ort_gradients(art, x, y, noise)
    assert loss_ort == pytest.approx(loss_pt, rel=1e-5)
    assert set(grads_ort) == set(grads_pt)
    for name, g in grads_pt.items():
        np.testing.assert_allclose(grads_ort[name], g.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)


@needs_ort
@pytest.mark.parametrize("case", [MLP, CNN, ENCODER], ids=lambda c: c.name)
def test_any_batch_size_trains_and_evaluates(case: Case, tmp_path) -> None:
    # exported at the example's batch, run at a smaller one (an epoch's last, partial batch)
    _, fast, x, _ = Case(case.name, case.factory, case.shape, "crs").build()
    art, lowered = export_with_noise(fast, x, tmp_path, optimizer="sgd")
    g = torch.Generator().manual_seed(3)
    small = (case.shape[0] - 3, *case.shape[1:])
    x2, y2 = torch.randn(small, generator=g), torch.randint(0, 10, (small[0],), generator=g)
    noise = lowered.noise_tensors(g)
    lowered.module.eval()  # first: a training step below moves BatchNorm's running statistics
    want = F.cross_entropy(lowered.module(x2, *noise), y2).item()  # eval: exact, noise unread
    assert OrtTrainer(art).evaluate(x2, y2) == pytest.approx(want, rel=1e-5)
    loss_pt, grads_pt = torch_gradients(lowered.module, x2, y2, noise)
    loss_ort, grads_ort = ort_gradients(art, x2, y2, noise)
    assert loss_ort == pytest.approx(loss_pt, rel=1e-5)
    for name, grad in grads_pt.items():
        np.testing.assert_allclose(grads_ort[name], grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)


@needs_ort
@pytest.mark.slow
@pytest.mark.parametrize("case", [MLP, CNN], ids=lambda c: c.name)
def test_sgd_parity_20_steps(case: Case, tmp_path) -> None:
    model, fast, x, _ = case.build()
    g = torch.Generator().manual_seed(2)
    four = [
        (torch.randn(case.shape, generator=g), torch.randint(0, 10, (case.shape[0],), generator=g))
        for _ in range(4)
    ]
    batches = four * 5  # 20 steps over 4 batches, so the loss can fall
    lr = 0.05
    start = snapshot(model)
    art = export_training(fast, (x,), tmp_path, optimizer="sgd")  # before torch trains the shared weights
    trainer = OrtTrainer(art, lr=lr)
    ort_losses = trainer.fit(batches, progress=False)
    torch_losses = sgd_torch(fast, batches, lr)
    np.testing.assert_allclose(ort_losses, torch_losses, rtol=1e-4)
    assert sum(torch_losses[-4:]) < sum(torch_losses[:4])
    trained = dict(fast.named_parameters())
    for name, value in trainer.parameters(trainable_only=True).items():
        np.testing.assert_allclose(value, trained[name].detach().numpy(), rtol=1e-4, atol=1e-4, err_msg=name)
        assert not np.array_equal(value, start.state_dict()[name].numpy()), f"{name} never trained"


@needs_ort
def test_artifacts_record_survives_the_directory(tmp_path) -> None:
    _, fast, x, _ = Case("mlp", models.mlp, (32, 64), "crs").build()
    art = export_training(fast, (x,), tmp_path, optimizer="sgd", loss="mse", noise="input")
    assert art.noise and art.transposed  # the fields a reader could lose
    assert Artifacts.load(tmp_path) == art


@needs_ort
def test_adamw_trains_and_round_trips_exactly(tmp_path) -> None:
    model, fast, x, y = MLP.build()
    art = export_training(fast, (x,), tmp_path)  # AdamW by default
    trainer = OrtTrainer(art, lr=1e-2)
    losses = trainer.fit([(x, y)] * 15, progress=False)
    assert losses[-1] < 0.9 * losses[0]
    target = snapshot(model)
    load_parameters(target, trainer.parameters())
    for name, p in target.named_parameters():
        assert np.array_equal(p.detach().numpy(), trainer.parameters()[name]), name  # bit for bit
    assert set(trainer.parameters(trainable_only=True)) == {n for n, _ in model.named_parameters()}
    # the exact eval graph's loss is the trained PyTorch model's eval loss
    target.eval()
    assert trainer.evaluate(x, y) == pytest.approx(F.cross_entropy(target(x), y).item(), rel=1e-5)


@needs_ort
@pytest.mark.parametrize("case", [MLP, CNN, ENCODER], ids=lambda c: c.name)
def test_eval_graph_is_exact(case: Case, tmp_path) -> None:
    import onnxruntime

    model, fast, x, _ = case.build()
    path = export_onnx(fast, (x,), tmp_path / "eval.onnx", training=False)
    assert not {"TopK", "RandomUniform", "RandomUniformLike", "NonZero"} & set(_ops(path))
    out = onnxruntime.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]
    model.eval()
    np.testing.assert_allclose(out, model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    assert fast.training  # export left the module's mode alone


def test_lowered_record_names_its_graph_inputs() -> None:
    _, fast, _, _ = Case("mlp", models.mlp, (32, 64), "crs").build()
    lowered = lower_for_export(fast, noise="input")
    assert lowered.noise
    assert lowered.input_names == ("input", *(n.name for n in lowered.noise))
    assert lowered.model_inputs == 1
    assert lower_for_export(fast).input_names == ("input",)


@needs_ort
@pytest.mark.parametrize("case", [CNN, ENCODER], ids=lambda c: c.name)
def test_one_export_one_generate_artifacts(case: Case, tmp_path, monkeypatch) -> None:
    # The exact eval graph is cut from the single export, not exported and generated again.
    import onnxruntime
    from onnxruntime.training import artifacts as ort_artifacts

    calls = {"export": 0, "generate": 0}
    real_export, real_generate = torch.onnx.export, ort_artifacts.generate_artifacts

    def export(*a, **k):
        calls["export"] += 1
        return real_export(*a, **k)

    def generate(*a, **k):
        calls["generate"] += 1
        return real_generate(*a, **k)

    monkeypatch.setattr(torch.onnx, "export", export)
    monkeypatch.setattr(ort_artifacts, "generate_artifacts", generate)
    model, fast, x, y = Case(case.name, case.factory, case.shape, "crs").build()
    art = export_training(fast, (x,), tmp_path, optimizer="sgd", noise="input")
    assert calls == {"export": 1, "generate": 1}
    train_graph, eval_graph = (
        onnx.load(str(tmp_path / "model_train.onnx")),
        onnx.load(str(tmp_path / "model_eval.onnx")),
    )
    noise = {n.name for n in art.noise}
    assert noise and noise <= {i.name for i in train_graph.graph.input}
    assert [i.name for i in eval_graph.graph.input] == ["input"]  # no noise, no switch
    assert "approxcompile_sampling" not in {i.name for i in train_graph.graph.input}
    assert {"TopK", "GatherND"} <= {n.op_type for n in train_graph.graph.node}  # crs: TopK on keys
    exact_ops = {n.op_type for n in eval_graph.graph.node}
    assert not {"TopK", "GatherND", "RandomUniform", "RandomUniformLike", "Where"} & exact_ops
    # the cut eval graph, alone and as ORT's eval model, computes the PyTorch model's eval output
    feeds = {"input": x.numpy()}
    out = onnxruntime.InferenceSession(str(tmp_path / "model_eval.onnx")).run(None, feeds)[0]
    lowered = lower_for_export(fast, transpose_weights=True).module.eval()
    np.testing.assert_allclose(out, lowered(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    model.eval()
    np.testing.assert_allclose(out, model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    assert OrtTrainer(art).evaluate(x, y) == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-5)


@needs_ort
def test_eval_model_is_what_generate_artifacts_builds(tmp_path) -> None:
    from onnxruntime.training import artifacts as ort_artifacts

    from approxcompile.export.artifacts import eval_model
    from approxcompile.export.quiet import quiet

    _, fast, x, _ = CNN.build()  # BatchNorm: its eval form matters
    export_training(fast, (x,), tmp_path / "art", optimizer="sgd")
    forward = onnx.load(str(tmp_path / "art" / "model_eval.onnx"))
    lowered = lower_for_export(fast, transpose_weights=True).module
    params = [n for n, p in lowered.named_parameters() if p.requires_grad]
    frozen = [n for n in lowered.state_dict() if n not in params]
    (tmp_path / "ort").mkdir()
    with quiet():
        ort_artifacts.generate_artifacts(
            forward,
            requires_grad=params,
            frozen_params=frozen,
            loss=ort_artifacts.LossType.CrossEntropyLoss,
            optimizer=ort_artifacts.OptimType.SGD,
            artifact_directory=str(tmp_path / "ort"),
        )

    def text(model: onnx.ModelProto) -> str:  # ORT numbers the loss's value names process-wide
        return re.sub(r"::\d+", "::N", str(model.graph))

    theirs = text(onnx.load(str(tmp_path / "ort" / "eval_model.onnx")))
    assert text(eval_model(forward, params=params, frozen=frozen, loss="cross_entropy")) == theirs
    assert text(onnx.load(str(tmp_path / "art" / "eval_model.onnx"))) == theirs
    assert "SoftmaxCrossEntropyLoss" in theirs and "training_mode" in theirs  # the BatchNorm's, now 0
