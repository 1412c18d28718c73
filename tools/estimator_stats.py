"""Bias and variance of every sampling method on fixed inputs, and the kept counts of two Bernoullis.

Each method estimates a product many times (``--draws``, each a fresh draw from a seeded
generator) at keep 0.1 as the runtime op ``sampled_matmul`` does (scores ``|A[:, i]|·|B[i, :]|``,
``sample_pairs``, the kept slices scaled and multiplied), on fixed inputs (seeded):

- ``dot``: a 12,800-long dot product ``a·b`` whose entries have log-normal magnitudes
  (a few pairs carry most of the sum), the kind of test WTA-CRS's authors ran;
- ``skewed``: ``(64, 1024) @ (1024, 64)`` with log-normal column norms of ``A`` and row
  norms of ``B``, i.e. skewed pair scores;
- ``flat``: the same shapes with standard normal entries (every pair about as large).

Per draw, with ``C`` the exact product and ``Ĉ`` the estimate:

- signed relative error ``r = <Ĉ - C, C> / |C|²`` (for a dot product ``(ĉ - c)/c``): its mean
  over draws is the bias, ``std/√draws`` its standard error, so an unbiased method has
  ``|mean| / SE`` of a few at most;
- ``rms``: ``sqrt(mean |Ĉ - C|²_F) / |C|_F``, the root-mean-square relative error;
- ``pairs``: the number of distinct pairs kept, averaged.

``--kept`` adds the expected number of pairs the ``bernoulli`` method keeps at keep 0.4 on the
benchmark MLP's second layer (4096 inputs, ``tools/bench_models.py``, fixed batch, at
initialisation), against the Bernoulli of the paper's code, which mixes the uniform term in
after clamping and with weight ``eps/n`` (so its probabilities sum to ``(1-eps)·k + eps`` at
most, below ``k``).

    .venv/bin/python tools/estimator_stats.py --markdown --kept --timing   # docs/estimators.md
    .venv/bin/python tools/estimator_stats.py --draws 200                  # JSON, fewer draws

``--timing`` adds the median time of one selection (``sample_pairs`` given the scores) per
method at ``n = 4096, k = 1638``. ``tests/test_estimator_stats.py`` asserts on :func:`measure`'s figures.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from approxcompile.choices import METHODS
from approxcompile.ops.estimator import DEFAULT_EPS, inclusion, probabilities
from approxcompile.ops.kernels import column_norms
from approxcompile.ops.sampling import sample_pairs
from approxcompile.plan import kept_count

INPUTS = ("dot", "skewed", "flat")


def operands(name: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The fixed factors ``(A, B)`` of input ``name``."""
    g = torch.Generator().manual_seed(seed)
    if name == "dot":
        n = 12_800
        a = torch.randn(n, generator=g) * torch.exp(1.5 * torch.randn(n, generator=g))
        b = torch.randn(n, generator=g) * torch.exp(1.5 * torch.randn(n, generator=g))
        return a.view(1, n), b.view(n, 1)
    if name == "skewed":
        a = torch.randn(64, 1024, generator=g) * torch.exp(1.5 * torch.randn(1, 1024, generator=g))
        b = torch.randn(1024, 64, generator=g) * torch.exp(1.0 * torch.randn(1024, 1, generator=g))
        return a, b
    if name == "flat":
        return torch.randn(64, 1024, generator=g), torch.randn(1024, 64, generator=g)
    raise ValueError(f"unknown input {name!r}; choose from {INPUTS}")


@dataclass(frozen=True, kw_only=True)
class Stats:
    """One method on one input, over ``draws`` draws."""

    input: str
    method: str
    keep: float
    draws: int
    mean: float  # mean signed relative error: the bias
    std: float  # its standard deviation over draws
    se: float  # standard error of the mean: std / sqrt(draws)
    rms: float  # root-mean-square relative Frobenius error
    pairs: float  # distinct pairs kept, averaged

    @property
    def z(self) -> float:
        """``|mean| / se``: a few at most for an unbiased method (inf for a biased deterministic one)."""
        if self.std <= 1e-12 * abs(self.mean):  # every draw the same: rounding is all the spread
            return 0.0 if self.mean == 0 else math.inf
        return abs(self.mean) / self.se


def estimate(a: Tensor, b: Tensor, k: int, method: str, g: torch.Generator) -> tuple[Tensor, int]:
    """One sampled ``a @ b`` over ``k`` pairs (as ``sampled_matmul`` computes it) and its distinct pairs."""
    index, scale = sample_pairs(column_norms(a) * column_norms(b.t()), k, method, generator=g)
    a_s = a.index_select(1, index)
    if scale is not None:
        a_s = a_s * scale
    kept = index if scale is None else index[scale > 0]
    return a_s @ b.index_select(0, index), int(torch.unique(kept).numel())


def measure(name: str, method: str, *, keep: float = 0.1, draws: int = 500, seed: int = 0) -> Stats:
    """Estimate input ``name``'s product ``draws`` times with ``method``; its error statistics."""
    a, b = operands(name)
    exact = a.double() @ b.double()
    norm2 = float((exact * exact).sum())
    k = kept_count(keep, a.shape[1])
    g = torch.Generator().manual_seed(seed)
    signed, squared, pairs = [], [], []
    for _ in range(draws):
        est, kept = estimate(a, b, k, method, g)
        err = est.double() - exact
        signed.append(float((err * exact).sum()) / norm2)
        squared.append(float((err * err).sum()) / norm2)
        pairs.append(kept)
    mean = sum(signed) / draws
    std = math.sqrt(sum((s - mean) ** 2 for s in signed) / max(draws - 1, 1))
    return Stats(
        input=name,
        method=method,
        keep=keep,
        draws=draws,
        mean=mean,
        std=std,
        se=std / math.sqrt(draws),
        rms=math.sqrt(sum(squared) / draws),
        pairs=sum(pairs) / draws,
    )


def kept_counts(keep: float = 0.4, eps: float = DEFAULT_EPS, seed: int = 0) -> dict[str, float]:
    """Expected pairs kept by approxcompile's Bernoulli and by the paper code's, on the MLP's 2nd layer."""
    from bench_models import build  # tools/ is on the path when this runs as a script or in tests

    w = build("mlp", "full", seed=seed)
    layers = w.model.layers  # type: ignore[attr-defined]
    with torch.no_grad():
        h = torch.relu(layers[0](w.x))
        scores = column_norms(h) * column_norms(layers[1].weight)
    n = scores.numel()
    k = kept_count(keep, n)
    ours = float(inclusion(probabilities(scores, eps), k).sum())
    # The paper's code: clamp k·a/sum(a) to [0, 1] first, then mix in eps times 1/n.
    paper = float(((1 - eps) * (k * scores / scores.sum()).clamp(0, 1) + eps / n).sum())
    return {
        "n": n,
        "k": k,
        "eps": eps,
        "approxcompile": ours,
        "paper_code": paper,
        "paper_bound": (1 - eps) * k + eps,
    }


def selection_ms(method: str, n: int = 4096, k: int = 1638, calls: int = 200, seed: int = 0) -> float:
    """Median milliseconds of one ``sample_pairs`` call (scores given) on skewed scores."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, generator=g) ** 4
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        sample_pairs(scores, k, method, generator=g)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def table(rows: list[Stats]) -> str:
    head = "| input | method | bias (mean rel. error) | std | mean / SE | rms rel. error | pairs kept |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|"]
    for s in rows:
        z = "∞" if math.isinf(s.z) else f"{s.z:.1f}"
        lines.append(
            f"| {s.input} | {s.method} | {s.mean:+.4f} | {s.std:.4f} | {z} | {s.rms:.4f} | {s.pairs:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--draws", type=int, default=500)
    p.add_argument("--keep", type=float, default=0.1)
    p.add_argument("--inputs", default=",".join(INPUTS))
    p.add_argument("--kept", action="store_true", help="also the Bernoulli kept counts on the MLP")
    p.add_argument("--timing", action="store_true", help="also time one selection per method")
    p.add_argument("--markdown", action="store_true", help="a markdown table instead of JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the same sums in the same order on any machine
    rows = [
        measure(name, method, keep=args.keep, draws=args.draws)
        for name in args.inputs.split(",")
        for method in METHODS
    ]
    kept = kept_counts() if args.kept else None
    timing = {m: selection_ms(m) for m in METHODS} if args.timing else None
    if args.markdown:
        print(table(rows))
        if timing is not None:
            ms = ", ".join(f"{m} {t:.2f}" for m, t in timing.items())
            print(f"\nSelection ms per call (n = 4096, k = 1638, one thread, median of 200): {ms}")
        if kept is not None:
            print(f"\nBernoulli expected kept pairs at k = {kept['k']} of {kept['n']} (eps {kept['eps']}):")
            print(f"approxcompile {kept['approxcompile']:.1f}, paper code {kept['paper_code']:.1f}")
            print(f"(paper code's bound without clamping: (1-eps)·k + eps = {kept['paper_bound']:.1f})")
    else:
        rows_out = [asdict(r) | {"z": r.z} for r in rows]
        json.dump({"rows": rows_out, "kept": kept, "selection_ms": timing}, sys.stdout, indent=1)
        print()


if __name__ == "__main__":
    main()
