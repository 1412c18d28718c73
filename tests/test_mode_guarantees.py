"""The saving and sharing guarantees for the two kinds of result that are not one plain graph.

- code that branches on ``self.training`` (export frontend): an ``ApproxModule`` carrying an
  eval graph; pickling, ``torch.save``, ``deepcopy`` and conversions must keep both graphs;
- data-dependent control flow (dynamo frontend): a ``DynamoModule``, which shares the model's
  tensors and refuses to be saved with a ``SaveError`` that says what to do.

Before these tests, ``optimize`` returned the capture's own module for both kinds: buffers
cloned (training never reached the model's BatchNorm statistics) and, for the first kind,
pickling lost the eval graph.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import approxcompile
from approxcompile.errors import SaveError
from approxcompile.module import ApproxModule
from approxcompile.passes.dynamo import DynamoModule
from approxcompile.plan import META_KEY
from tests.capture_models import Branchy

X = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))


class TrainingBranch(nn.Module):
    """BatchNorm, dropout on ``self.training`` and an ``if self.training:`` branch."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 128), nn.Linear(128, 128), nn.Linear(128, 8)
        self.bn = nn.BatchNorm1d(128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.b(F.relu(self.a(x)))))
        if self.training:
            h = h + 0.5  # a shift only while training: eval must not see it
        return self.c(F.dropout(h, 0.25, training=self.training))


class DataBranch(Branchy):
    """Branchy with BatchNorm before its branch on the values (dynamo frontend)."""

    def __init__(self) -> None:
        super().__init__()  # the same layers, created in the same order, then the BatchNorm
        self.bn = nn.BatchNorm1d(128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.a(x)))
        h = self.pos(h) if h.mean() > 0.1 else self.neg(h)
        return self.out(F.relu(h))


def _optimize(cls: type[nn.Module]) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = cls()
    fast = approxcompile.optimize(model, 0.6, example_inputs=(X,))
    assert approxcompile.report(fast).sampled
    return model, fast


def _steps(module: nn.Module, steps: int = 2, seed: int = 3) -> list[float]:
    torch.manual_seed(seed)
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    module.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = module(X).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _round_trips(fast: nn.Module) -> list[nn.Module]:
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    return [torch.load(buf, weights_only=False), pickle.loads(pickle.dumps(fast)), copy.deepcopy(fast)]


# -- code that reads self.training ----------------------------------------------------------


def test_training_branch_result_is_an_approx_module_with_both_graphs() -> None:
    model, fast = _optimize(TrainingBranch)
    assert isinstance(fast, ApproxModule) and fast.eval_graph is not None
    assert fast.meta[META_KEY].frontend == "export"
    assert list(fast.state_dict()) == list(model.state_dict())
    for (k, a), (_, b) in zip(model.state_dict().items(), fast.state_dict().items(), strict=True):
        assert a.data_ptr() == b.data_ptr(), k  # one set of tensors, BatchNorm buffers included
    fast.train()
    assert not torch.equal(fast(X), fast(X))  # dropout and sampling are live
    model.eval()
    fast.eval()
    assert torch.equal(fast(X), model(X))  # the eval graph: no shift, no dropout, exact products


def test_training_branch_round_trips_keep_both_graphs_and_continue_training() -> None:
    model, fast = _optimize(TrainingBranch)
    _steps(fast, steps=1)  # BatchNorm statistics move, in the model too
    assert int(model.bn.num_batches_tracked) == 1
    for loaded in _round_trips(fast):
        assert isinstance(loaded, ApproxModule)
        assert loaded.code == fast.code
        assert str(loaded.eval_graph) == str(fast.eval_graph)
        assert approxcompile.report(loaded).plan == approxcompile.report(fast).plan
        assert list(loaded.state_dict()) == list(fast.state_dict())
        for (k, a), (_, b) in zip(loaded.state_dict().items(), fast.state_dict().items(), strict=True):
            assert torch.equal(a, b), k
        loaded.eval()
        model.eval()
        assert torch.equal(loaded(X), model(X))  # the self.training branch is honoured after loading
        probe = copy.deepcopy(loaded).train()  # forward in train mode moves BatchNorm statistics
        assert not torch.equal(probe(X), probe(X))  # still samples and drops out
        ref = copy.deepcopy(fast)
        assert _steps(loaded) == _steps(ref)  # continues training exactly as the saved module
        for (k, a), (_, b) in zip(loaded.state_dict().items(), ref.state_dict().items(), strict=True):
            assert torch.equal(a, b), k


def test_training_branch_loaded_module_is_standalone() -> None:
    model, fast = _optimize(TrainingBranch)
    loaded = pickle.loads(pickle.dumps(fast))
    before = model.a.weight.clone()
    _steps(loaded)
    assert torch.equal(model.a.weight, before)
    assert int(model.bn.num_batches_tracked) == 0


def test_training_branch_conversions_reach_the_model_and_the_eval_graph() -> None:
    model, fast = _optimize(TrainingBranch)
    fast.double()
    assert model.bn.running_mean.dtype == torch.float64 and model.a.weight.dtype == torch.float64
    assert model.bn.running_mean is fast.bn.running_mean
    fast.train()
    fast(X.double()).sum().backward()  # a training step runs in float64
    model.eval()
    fast.eval()
    assert torch.equal(fast(X.double()), model(X.double()))  # the eval graph reads the converted tensors
    model.float()  # and the other way: converting the model converts fast
    assert fast.bn.running_var.dtype == torch.float32
    assert torch.equal(fast(X), model(X))


def test_training_branch_export_is_refused_not_silently_wrong() -> None:
    from approxcompile.export import ExportError, export_onnx

    _, fast = _optimize(TrainingBranch)
    with pytest.raises(ExportError, match="branches on self.training"):
        export_onnx(fast, (X,), "unused.onnx")


# -- data-dependent control flow (dynamo) -----------------------------------------------------


def test_dynamo_result_shares_the_models_tensors() -> None:
    model, fast = _optimize(DataBranch)
    assert isinstance(fast, DynamoModule)
    assert list(fast.state_dict()) == list(model.state_dict())
    for (k, a), (_, b) in zip(model.state_dict().items(), fast.state_dict().items(), strict=True):
        assert a.data_ptr() == b.data_ptr(), k
    assert int(model.bn.num_batches_tracked) == 0  # planning left the statistics alone
    _steps(fast, steps=2)
    assert int(model.bn.num_batches_tracked) == 2  # training fast updates the model's statistics
    model.eval()
    fast.eval()
    assert torch.equal(fast(X), model(X))
    fast.train()
    torch.manual_seed(0)
    model.train()
    exact = model(X)
    assert not torch.equal(fast(X), exact)  # training samples


def test_dynamo_result_conversions_reach_the_model() -> None:
    model, fast = _optimize(DataBranch)
    fast.double()
    assert model.bn.running_mean.dtype == torch.float64 and model.a.weight.dtype == torch.float64
    assert model.bn.running_mean is fast.bn.running_mean
    model.eval()
    fast.eval()
    assert torch.equal(fast(X.double()), model(X.double()))


def test_dynamo_result_refuses_to_be_saved_and_says_what_to_do() -> None:
    _, fast = _optimize(DataBranch)
    for save in (
        lambda: torch.save(fast, io.BytesIO()),
        lambda: pickle.dumps(fast),
        lambda: copy.deepcopy(fast),
    ):
        with pytest.raises(SaveError, match="dynamo frontend") as info:
            save()
        assert "state_dict" in str(info.value) and "plan=" in str(info.value)
    state = fast.state_dict()  # what can be saved: the tensors, under the model's keys
    torch.save(state, io.BytesIO())
