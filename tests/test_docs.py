"""Docs that cannot go stale: every output shown in README.md and docs/ is re-made and compared.

A fenced block without a language (or tagged ``text``/``console``) shows output, and the line
before it must say where the output comes from:

- ``<!-- doc-output: run CMD -->``: the test runs ``CMD`` with bash in an empty directory
  (``approxcompile`` and ``python`` from this environment, the repository on ``PYTHONPATH``,
  ``COLUMNS=100``) and compares its stdout with the block. A last line ``...`` in the block
  elides the rest. ``numbers=any`` after ``run`` lets every number differ (timings), while the
  words and the layout must still match.
- ``<!-- doc-output: record ... -->``: a measurement made by a tool under ``tools/`` on a
  particular machine (the marker names the command); not re-run here.

Blocks tagged ``bash``, ``python`` ... are input and are not checked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
MARKER = re.compile(r"<!-- doc-output: (run|record)\b(.*?)-->", re.S)
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?[KMGT]?")
OUTPUT_TAGS = ("", "text", "console")


def _blocks() -> list[tuple[str, int, str | None, str]]:
    """``(file, line, marker or None, body)`` of every output block."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) not in OUTPUT_TAGS:
                continue
            before = text[: m.start()].rstrip("\n")
            last = before[before.rfind("<!--") :] if before.endswith("-->") else ""
            line = text.count("\n", 0, m.start()) + 1
            out.append((path.relative_to(ROOT).as_posix(), line, last or None, m.group(2)))
    return out


BLOCKS = _blocks()
RUNS = [b for b in BLOCKS if b[2] and MARKER.match(b[2]) and MARKER.match(b[2]).group(1) == "run"]  # type: ignore[union-attr]


def test_every_output_block_says_where_it_comes_from() -> None:
    unmarked = [f"{f}:{line}" for f, line, marker, _ in BLOCKS if marker is None or not MARKER.match(marker)]
    assert not unmarked, (
        f"output blocks without a doc-output marker (see tests/test_docs.py): {unmarked}; "
        "tag input blocks with their language (bash, python)"
    )
    assert len(RUNS) >= 5  # the report table, the code, both --help texts, an error, the warnings


def _shape(line: str) -> str:
    return NUMBER.sub("#", line)


def _compare(expected: str, actual: str, any_number: bool) -> list[str]:
    want = expected.rstrip("\n").splitlines()
    got = actual.strip("\n").splitlines()
    if want and want[-1] == "...":
        want, got = want[:-1], got[: len(want) - 1]
    problems = []
    for i in range(max(len(want), len(got))):
        w = want[i].rstrip() if i < len(want) else "<missing>"
        g = got[i].rstrip() if i < len(got) else "<missing>"
        same = _shape(w) == _shape(g) if any_number else w == g
        if not same:
            problems.append(f"line {i + 1}:\n  doc: {w}\n  now: {g}")
    return problems


@pytest.mark.slow
@pytest.mark.parametrize(("where", "line", "marker", "body"), RUNS, ids=[f"{b[0]}:{b[1]}" for b in RUNS])
def test_output_block_matches_what_the_command_prints(
    where: str, line: int, marker: str, body: str, tmp_path: Path
) -> None:
    spec = MARKER.match(marker).group(2).strip()  # type: ignore[union-attr]
    any_number = spec.startswith("numbers=any")
    command = spec.removeprefix("numbers=any").strip()
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
        "COLUMNS": "100",
    }
    done = subprocess.run(
        ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    problems = _compare(body, done.stdout, any_number)
    assert not problems, (
        f"{where}:{line} is stale; `{command}` now prints (stderr: {done.stderr[-500:]!r}):\n"
        + "\n".join(problems[:10])
    )
