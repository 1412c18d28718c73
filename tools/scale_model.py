"""Step time of data-parallel training at scale, on paper: exact DDP vs the sampled all-reduce hook.

A cost model, not a measurement; docs/distributed.md ("Scaling on paper") states its
assumptions. Per rank and step, with W ranks each behind its own link of R bit/s (a switch),
ring all-reduce of B bytes of gradients cut into ``n_b`` buckets, no overlap of communication
with compute:

    t(W, R) = t_compute + 2 (W - 1) / W * 8 B / R + 2 (W - 1) * n_b * alpha

exact: ``B = P * bytes_per_grad``; hook: ``B * f`` (``f`` the byte fraction the hook sends) and
``t_compute * c`` (``c`` the sampled step's compute relative to exact). ``f`` and ``c`` come from
the bandwidth benchmark's JSON (tools/bench_ddp.py --link ... --json): ``f`` is the measured
bytes ratio; the ratio of the fitted link-independent times of approx (sampled, DDP's own
all-reduce) and exact is printed for the record, but ``c`` is ``--compute-ratio`` (default 1:
no compute saving, so the table isolates what the hook's bytes are worth; CPU timings on a
loaded machine say little about a GPU's). The hook's gather/scatter copies (a few ms per GB
at GPU memory speed) are left out.

    .venv/bin/python tools/scale_model.py --measured docs/figures/ddp_links.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def step_time(
    *, world: int, rate: float, grad_bytes: float, compute_s: float, buckets: int, alpha_s: float
) -> float:
    """Seconds per step: compute + ring all-reduce bandwidth term + its per-message latency."""
    if world == 1:
        return compute_s
    ring = 2 * (world - 1) / world * 8 * grad_bytes / rate
    return compute_s + ring + 2 * (world - 1) * buckets * alpha_s


def measured_ratios(path: Path, world: int = 2) -> tuple[float, float]:
    """``(f, c)`` from a bench_ddp --link JSON: hook bytes / exact bytes, hook compute / exact compute."""
    data = json.loads(path.read_text())
    (result,) = (r for r in data["results"] if r["world"] == world)
    f = result["bytes_per_step"]["approx+hook"] / result["bytes_per_step"]["exact"]
    fits = data["fits"][str(world)]
    c = fits["approx"][0] / fits["exact"][0]  # the sampled products; the hook's copies are left out
    return f, c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--measured", type=Path, help="bench_ddp --link JSON to take f and c from")
    ap.add_argument("--measured-world", type=int, default=2, help="which rank count's fit to use")
    ap.add_argument("--fraction", type=float, default=0.415, help="f, if no --measured")
    ap.add_argument("--compute-ratio", type=float, default=1.0, help="c, if no --measured")
    ap.add_argument("--params", type=float, default=1e9)
    ap.add_argument("--grad-bytes", type=float, default=2.0, help="bytes per gradient element (bf16: 2)")
    ap.add_argument("--tokens", type=float, default=16384, help="tokens per rank per step (8 x 2048)")
    ap.add_argument("--flops", type=float, default=125e12, help="sustained FLOP/s per rank")
    ap.add_argument("--bucket-mb", type=float, default=25.0, help="DDP bucket size")
    ap.add_argument("--alpha-us", type=float, default=20.0, help="latency per ring message, microseconds")
    ap.add_argument("--worlds", default="8,16,32,64")
    ap.add_argument("--links", default="10,25,100,400", help="Gbit/s per rank")
    args = ap.parse_args(argv)
    f, c = args.fraction, args.compute_ratio
    if args.measured is not None:  # the byte fraction; the compute ratio only for the record (noisy)
        f, fitted_c = measured_ratios(args.measured, args.measured_world)
        print(f"measured: f={f:.4f}; fitted sampled/exact compute {fitted_c:.3f} (not used: c={c:g})")
    compute = 6 * args.params * args.tokens / args.flops  # forward + backward, dense
    grad_bytes = args.params * args.grad_bytes
    buckets = max(1, round(grad_bytes / (args.bucket_mb * 2**20)))
    alpha = args.alpha_us * 1e-6
    print(
        f"P={args.params:g} params, {args.grad_bytes:g} B/grad, {args.tokens:g} tokens/rank, "
        f"{args.flops / 1e12:g} TFLOP/s/rank -> exact compute {compute:.3f} s; f={f:.3f}, c={c:.3f}; "
        f"{buckets} buckets, alpha={args.alpha_us:g} us"
    )
    print(
        "| ranks | link Gbit/s | exact s | sampled s | sampled + hook s | hook vs exact | hook vs sampled |"
    )
    print("|---|---|---|---|---|---|---|")
    for world in (int(w) for w in args.worlds.split(",")):
        for gbit in (float(g) for g in args.links.split(",")):
            kw = {"world": world, "rate": gbit * 1e9, "buckets": buckets, "alpha_s": alpha}
            exact = step_time(grad_bytes=grad_bytes, compute_s=compute, **kw)
            sampled = step_time(grad_bytes=grad_bytes, compute_s=compute * c, **kw)
            hook = step_time(grad_bytes=grad_bytes * f, compute_s=compute * c, **kw)
            print(
                f"| {world} | {gbit:g} | {exact:.2f} | {sampled:.2f} | {hook:.2f} | {exact / hook:.2f}x | "
                f"{sampled / hook:.2f}x |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
