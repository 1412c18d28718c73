"""Re-make the output blocks of README.md and docs/ from their ``doc-output: run`` markers.

    .venv/bin/python tools/docs_output.py           # rewrite stale blocks in place
    .venv/bin/python tools/docs_output.py --check   # list stale blocks, change nothing

``tests/test_docs.py`` checks the same blocks; this script is how they are written. Blocks with
``numbers=any`` are rewritten only when their words or layout changed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_docs import DOCS, FENCE, MARKER, _compare  # noqa: E402


def run(command: str) -> str:
    env = {
        **os.environ,
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
        "COLUMNS": "100",
    }
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(["bash", "-c", command], cwd=tmp, env=env, capture_output=True, text=True)
    return done.stdout.strip("\n") + "\n"


def update(path: Path, check: bool) -> list[str]:
    text = path.read_text()
    stale: list[str] = []
    pieces, pos = [], 0
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n")
        marker = MARKER.match(before[before.rfind("<!--") :]) if before.endswith("-->") else None
        if m.group(1) not in ("", "text", "console") or marker is None or marker.group(1) != "run":
            continue
        spec = marker.group(2).strip()
        any_number = spec.startswith("numbers=any")
        body = m.group(2)
        now = run(spec.removeprefix("numbers=any").strip())
        if not _compare(body, now, any_number):
            continue
        stale.append(f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}")
        lines = body.rstrip("\n").splitlines()
        if lines and lines[-1] == "...":
            now = "\n".join(now.splitlines()[: len(lines) - 1] + ["..."]) + "\n"
        pieces += [text[pos : m.start(2)], now]
        pos = m.end(2)
    if stale and not check:
        path.write_text("".join(pieces) + text[pos:])
    return stale


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="list stale blocks without rewriting them")
    args = parser.parse_args()
    stale = [s for path in DOCS for s in update(path, args.check)]
    for s in stale:
        print(("stale: " if args.check else "rewrote: ") + s)
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
