"""A byte-level text corpus no one here wrote: the Python standard library's own source files.

Every Python install carries it, so no download and no tokenizer are needed: the model reads
raw bytes (a vocabulary of 256). The files are the ``*.py`` files directly under
``sysconfig.get_paths()["stdlib"]``, sorted by name; a file goes to validation when the SHA-256
of its name falls in the held-out tenth, so the split is the same on every machine with the
same Python version and does not move when a file is added or removed.

Batches are ``(x, y)`` next-byte pairs: windows of ``seq + 1`` bytes at offsets drawn from a
seeded generator, ``x`` the first ``seq`` bytes and ``y`` the next ``seq``::

    corpus = load_stdlib()
    for x, y in batches(corpus.train, steps=100, batch=16, seq=128, seed=0):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Corpus", "batches", "fixed_batches", "is_validation", "load_stdlib"]

VOCAB = 256


@dataclass(frozen=True, kw_only=True)
class Corpus:
    """Training and validation bytes (``uint8``, files concatenated in name order) and their files."""

    train: torch.Tensor
    val: torch.Tensor
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    root: str


def is_validation(name: str, held_out: int = 10) -> bool:
    """True for the file names (relative to the corpus root) held out for validation: 1 in ``held_out``."""
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % held_out == 0


def _bytes(paths: list[Path], limit: int | None) -> torch.Tensor:
    data = bytearray()
    for path in paths:
        if limit is not None and len(data) >= limit:
            break
        data += path.read_bytes()
    kept = data[:limit] if limit is not None else data
    return torch.frombuffer(kept, dtype=torch.uint8).clone() if kept else torch.zeros(0, dtype=torch.uint8)


def load_stdlib(*, limit: int | None = None, root: str | Path | None = None, held_out: int = 10) -> Corpus:
    """The corpus; ``limit`` caps each split's bytes (the first files in name order), for quick runs."""
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in base.glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(
            f"no *.py files under {base}: is this a Python install with its standard library?"
        )
    train = [p for p in files if not is_validation(p.name, held_out)]
    val = [p for p in files if is_validation(p.name, held_out)]
    return Corpus(
        train=_bytes(train, limit),
        val=_bytes(val, limit),
        train_files=tuple(p.name for p in train),
        val_files=tuple(p.name for p in val),
        root=str(base),
    )


def _windows(data: torch.Tensor, starts: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = data[starts[:, None] + torch.arange(seq + 1)].long()
    return w[:, :-1], w[:, 1:]


def batches(
    data: torch.Tensor, *, steps: int, batch: int, seq: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches of ``batch`` windows at offsets from a generator seeded with ``seed``."""
    if len(data) < seq + 2:
        raise ValueError(f"{len(data)} bytes cannot hold a window of {seq + 1}")
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield _windows(data, torch.randint(0, len(data) - seq - 1, (batch,), generator=g), seq)


def fixed_batches(
    data: torch.Tensor, *, count: int, batch: int, seq: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` evenly spaced, non-overlapping-where-possible windows: the same evaluation set every time."""
    n = count * batch
    starts = torch.linspace(0, len(data) - seq - 2, n).long()
    return [_windows(data, starts[i * batch : (i + 1) * batch], seq) for i in range(count)]
