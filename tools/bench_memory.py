"""Peak training memory only: ``tools/bench.py``'s memory column without the timing runs.

Each variant runs in a fresh process (``tools/bench.py``'s memory child): built from scratch,
``optimize`` included, then its first ``--memory-steps`` training steps; the figure is the
peak RSS over those steps minus the RSS right before the first one, as a user sees it.
Variants and options are ``tools/bench.py``'s; children run one at a time unless ``--jobs``.

    .venv/bin/python tools/bench_memory.py --models mlp,cnn --budgets 0.2,0.4,0.6,0.8 --threads 1
"""

from __future__ import annotations

import os
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor

from bench import _run_memory_child, parse_args, variant_names


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    jobs = 1
    if "--jobs" in argv:
        at = argv.index("--jobs")
        jobs = int(argv[at + 1])
        argv = argv[:at] + argv[at + 2 :]
    args = parse_args(argv)
    command = shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__), *sys.argv[1:]])
    print(f"Command: `{command}`")
    print(f"Load at the start: {os.getloadavg()[0]:.1f} (1-minute average, {os.cpu_count()} cores)\n")
    print("| model | variant | peak mem MB (first steps, above the built model) | vs exact |")
    print("|---|---|---:|---:|")
    for model in args.models:
        names = variant_names(args, model)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(lambda v, m=model: _run_memory_child(m, v, args), names))
        exact = next((r.get("peak_mb") for n, r in zip(names, results, strict=True) if n == "exact"), None)
        for name, r in zip(names, results, strict=True):
            if "error" in r:
                print(f"| {model} | {name} | error: {r['error']} | |")
                continue
            ratio = f"{r['peak_mb'] / exact:.2f}x" if exact else "n/a"
            print(f"| {model} | {name} | {r['peak_mb']:.1f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
