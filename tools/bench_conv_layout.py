"""What one sampled 3x3 convolution costs on this CPU, by kept channel count and memory layout (issue 16).

Times ``aten.convolution`` plus ``aten.convolution_backward`` (input, weight and bias
gradients) of a ``(batch, k, H, W) * (out, k, 3, 3)`` convolution, the products a sampled
conv runs after its gather, for several kept counts ``k``, in NCHW (contiguous) and in
channels-last layout; and the layout conversions and pooling around them. CPU time of
this process (``time.process_time``), which a busy neighbour on a shared machine disturbs
less than wall-clock time; variants interleaved, medians of ``--repeats``.

    .venv/bin/python tools/bench_conv_layout.py                     # the benchmark CNN's shapes
    .venv/bin/python tools/bench_conv_layout.py --size 16 --ks 48,51,64
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

CL = torch.channels_last


def conv_step(k: int, size: int, batch: int, out: int, layout: torch.memory_format) -> Callable[[], None]:
    """Forward and backward of one 3x3 convolution over ``k`` input channels, in ``layout``."""
    xs = torch.randn(batch, k, size, size).contiguous(memory_format=layout)
    ws = torch.randn(out, k, 3, 3).contiguous(memory_format=layout)
    dy = torch.randn(batch, out, size, size).contiguous(memory_format=layout)
    args = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)

    def run() -> None:
        torch.ops.aten.convolution(xs, ws, None, *args)
        torch.ops.aten.convolution_backward(dy, xs, ws, [out], *args, [True, True, True])

    return run


def around(size: int, batch: int, out: int) -> dict[str, Callable[[], object]]:
    """The work around a channels-last convolution in an NCHW model, and 2x2 max pooling."""
    x = torch.randn(batch, out, size, size)
    xc = x.contiguous(memory_format=CL)
    buf = torch.empty_like(xc)
    return {
        "NCHW -> channels-last copy, fresh memory": lambda: x.contiguous(memory_format=CL),
        "NCHW -> channels-last copy, reused memory": lambda: buf.copy_(x),
        "max_pool2d 2x2 forward, NCHW": lambda: F.max_pool2d(x, 2),
        "max_pool2d 2x2 forward, channels-last": lambda: F.max_pool2d(xc, 2),
    }


def median_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=32, help="spatial size H = W (the CNN has 32 and 16)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", type=int, default=128, help="output channels (and the layer's input channels)")
    p.add_argument("--ks", default="16,24,32,40,48,51,56,64,128", help="kept input channels")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    fns: dict[str, Callable[[], object]] = {}
    for k in ks:
        for tag, layout in (("NCHW", torch.contiguous_format), ("channels-last", CL)):
            fns[f"{tag} {k}"] = conv_step(k, args.size, args.batch, args.out, layout)
    ms = median_ms(fns, args.repeats)
    print(f"{args.batch}x{{k}}x{args.size}x{args.size} conv 3x3 -> {args.out} channels, forward + backward,")
    print(f"CPU ms, {args.threads} thread(s), {torch.backends.cpu.get_cpu_capability()}")
    print("| kept k | NCHW | channels-last |")
    print("|---:|---:|---:|")
    for k in ks:
        print(f"| {k} | {ms[f'NCHW {k}']:.1f} | {ms[f'channels-last {k}']:.1f} |")
    print()
    print(f"around it ({args.batch}x{args.out}x{args.size}x{args.size}):")
    for name, t in median_ms(around(args.size, args.batch, args.out), args.repeats).items():
        print(f"  {t:6.2f} ms  {name}")


if __name__ == "__main__":
    main()
