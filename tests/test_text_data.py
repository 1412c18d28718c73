"""The byte-level standard-library corpus: a fixed file split, next-byte pairs, a seeded order."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import text_data
import torch


@pytest.fixture(scope="module")
def small() -> text_data.Corpus:
    return text_data.load_stdlib(limit=200_000)


def test_the_split_is_by_file_and_fixed(small: text_data.Corpus) -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    names = sorted(p.name for p in root.glob("*.py"))
    assert sorted(small.train_files + small.val_files) == names
    assert not set(small.train_files) & set(small.val_files)
    assert 0.04 < len(small.val_files) / len(names) < 0.2  # about one file in ten
    assert small.val_files == tuple(n for n in names if text_data.is_validation(n))
    # the bytes are the files' own, in name order
    first = (root / small.train_files[0]).read_bytes()[:1000]
    assert bytes(small.train[: len(first)].tolist()) == first
    assert len(small.train) == len(small.val) == 200_000 and small.train.dtype == torch.uint8


def test_batches_are_next_byte_pairs_in_a_seeded_order(small: text_data.Corpus) -> None:
    a = list(text_data.batches(small.train, steps=3, batch=4, seq=16, seed=7))
    b = list(text_data.batches(small.train, steps=3, batch=4, seq=16, seed=7))
    c = list(text_data.batches(small.train, steps=3, batch=4, seq=16, seed=8))
    assert len(a) == 3 and all(x.shape == y.shape == (4, 16) and x.dtype == torch.long for x, y in a)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))
    assert not torch.equal(a[0][0], c[0][0])
    x, y = a[0]
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one byte
    text = bytes(small.train.tolist())
    assert bytes(x[0].tolist()) + bytes(y[0, -1:].tolist()) in text


def test_fixed_batches_are_the_same_every_time(small: text_data.Corpus) -> None:
    a = text_data.fixed_batches(small.val, count=2, batch=3, seq=8)
    b = text_data.fixed_batches(small.val, count=2, batch=3, seq=8)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b, strict=True)) and a[0][0].shape == (3, 8)
    with pytest.raises(ValueError, match="cannot hold a window"):
        next(text_data.batches(small.val[:5], steps=1, batch=1, seq=8, seed=0))
