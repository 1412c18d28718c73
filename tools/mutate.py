"""Mutation testing of one core module with cosmic-ray: ``make mutate MODULE=approxcompile/ops/sampling.py``.

cosmic-ray edits the module's file for each mutant and runs a test command. It does so in a
scratch copy of the working tree (``.mutate/<module>.tree``, tracked and untracked files, with
``approxcompile/passes`` linked to ``passes/`` as package-dir installs it), so the checkout
itself is never modified and tests can run there meanwhile; the copy imports its own
``approxcompile`` because ``python -m pytest`` puts the current directory first on
``sys.path``. Each module has a fast, targeted test selection (the tests that exercise it,
``slow`` ones left out). One mutant runs at a time, so two cores are enough.

The session database lands in ``.mutate/<module>.sqlite``: a second run resumes where the
first stopped (``--fresh`` starts over, ``--recheck`` runs the survivors again against the
current tests); ``cr-report .mutate/<module>.sqlite`` prints it again.
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTEST = "-x -q -p no:cacheprovider -m 'not slow'"

# module -> the tests that exercise it, as pytest arguments. Fast ones: the statistical tests
# (thousands of draws) and whole-model optimize() runs are left to `make test`, except where
# a module is only reached through optimize().
_STATISTICAL = (
    "-k 'not unbiased and not random_shapes and not random_conv and not crs_error and not catches_a_biased'"
)
TESTS = {
    "approxcompile/ops/estimator.py": "tests/test_mut_estimator.py tests/test_estimators.py "
    f"tests/test_estimator_core.py tests/test_ops.py {_STATISTICAL}",
    "approxcompile/ops/sampling.py": f"tests/test_estimators.py tests/test_ops.py {_STATISTICAL}",
    "approxcompile/ops/kernels.py": "tests/test_mut_kernels.py tests/test_kernels.py tests/test_ops.py "
    "tests/test_estimators.py "
    f"{_STATISTICAL}",
    "approxcompile/ops/sampled.py": f"tests/test_estimators.py tests/test_ops.py {_STATISTICAL}",
    "approxcompile/ops/shared.py": "tests/test_hook.py tests/test_distributed.py",
    "approxcompile/export/estimators.py": "tests/test_mut_export_estimators.py tests/test_estimator_core.py "
    "tests/test_estimators.py tests/test_export.py::test_stop_gradient_is_exact_and_has_no_gradient "
    f"{_STATISTICAL}",
    "approxcompile/plan.py": "tests/test_report_table.py tests/test_allocation.py tests/test_report.py",
    "approxcompile/report.py": "tests/test_report_table.py tests/test_report.py -k 'not optimize'",
    "approxcompile/distributed.py": "tests/test_hook.py tests/test_distributed.py",
    "passes/cost.py": "tests/test_mut_cost.py "
    "tests/test_flops.py::test_other_flops_are_the_hand_counted_products "
    "tests/test_optimize.py::test_flop_count_agrees_with_flop_counter_mode "
    "tests/test_report_table.py::test_optimize_with_overrides_reports_each_row_by_its_decision -k 'not cnn'",
    "passes/allocation.py": "tests/test_mut_allocation.py tests/test_allocation.py tests/test_select.py "
    "tests/test_report_table.py::test_optimize_with_overrides_reports_each_row_by_its_decision",
    "passes/exclusions.py": "tests/test_mut_exclusions.py "
    "tests/test_allocation.py::test_every_exclusion_names_its_reason "
    "tests/test_report_table.py::test_optimize_with_overrides_reports_each_row_by_its_decision "
    "tests/test_optimize.py::test_overrides_follow_qconfigmapping_precedence "
    "tests/test_optimize.py::test_default_budget_rewrites_middle_nodes_only tests/test_errors.py",
    "passes/rewrite.py": "tests/test_mut_rewrite.py "
    "tests/test_mut_exclusions.py::test_rewrite_reports_a_single_replacement_as_a_modification "
    "tests/test_optimize.py::test_golden_code_cnn "
    "tests/test_optimize.py::test_golden_code_mlp",
}

# Operators left out: bitwise and shift replacements of arithmetic, Pow/Mod targets, identity
# comparisons for value comparisons (and back), and the variable / decorator operators. They
# add hundreds of mutants per module that either crash at once (a float has no <<) or say
# nothing about the estimators; the arithmetic, comparison, boolean, number, loop and
# exception operators stay.
EXCLUDED = [
    r"core/ReplaceBinaryOperator_\w+_(RShift|LShift|BitOr|BitAnd|BitXor|Pow|Mod)$",
    r"core/ReplaceBinaryOperator_(RShift|LShift|Mod|Pow)_\w+$",
    r"core/ReplaceBinaryOperator_(Add|Sub|Mul)_FloorDiv$",
    r"core/ReplaceComparisonOperator_(Eq|NotEq|Lt|LtE|Gt|GtE)_(Is|IsNot)$",
    r"core/ReplaceComparisonOperator_(Is|IsNot)_(Lt|LtE|Gt|GtE)$",
    r"core/ReplaceUnaryOperator_\w*(Invert|UAdd)\w*$",
    r"core/VariableReplacer$",
    r"core/VariableInserter$",
    r"core/RemoveDecorator$",
]


def config(module: str, timeout: float, sock: Path) -> str:
    excluded = ", ".join(f"'{e}'" for e in EXCLUDED)
    runner = f"{sys.executable} {ROOT / 'tools' / 'forkserver.py'} run {sock} --"
    return (
        "[cosmic-ray]\n"
        f'module-path = "{module}"\n'
        f"timeout = {timeout}\n"
        "excluded-modules = []\n"
        f'test-command = "{runner} {PYTEST} {TESTS[module]}"\n\n'
        "[cosmic-ray.distributor]\n"
        'name = "local"\n\n'
        "[cosmic-ray.filters.operators-filter]\n"
        f"exclude-operators = [{excluded}]\n"
    )


def run(cwd: Path, env: dict[str, str], *cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, env=env, check=True)


def _scratch_copy(tree: Path) -> Path:
    """The working tree's files (tracked and untracked, not ignored) copied to ``tree``."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    if tree.exists():
        shutil.rmtree(tree)
    for name in filter(None, files):
        src = ROOT / name.decode()
        if src.is_file():
            dst = tree / name.decode()
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    (tree / "approxcompile" / "passes").symlink_to(Path("..") / "passes")
    return tree


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("module", nargs="?", help=f"one of: {', '.join(TESTS)}")
    ap.add_argument("--fresh", action="store_true", help="start a new session instead of resuming")
    ap.add_argument(
        "--timeout", type=float, default=120.0, help="seconds per mutant before it counts as killed"
    )
    ap.add_argument(
        "--recheck",
        action="store_true",
        help="run the surviving mutants of the last session again (after adding tests)",
    )
    ap.add_argument("--list", action="store_true", help="print the modules and their test selections")
    ap.add_argument(
        "--sample",
        type=int,
        default=None,
        metavar="N",
        help="with a new session: run only N mutants drawn at random (the rest are marked skipped)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the --sample draw (default 0)")
    args = ap.parse_args()
    if args.list or not args.module:
        for module, tests in TESTS.items():
            print(f"{module}: {tests}")
        return 0 if args.list else 2
    if args.module not in TESTS:
        print(
            f"mutate: no test selection for {args.module!r}; add it to TESTS in tools/mutate.py",
            file=sys.stderr,
        )
        return 2
    work = ROOT / ".mutate"
    stem = args.module.replace("/", "_").removesuffix(".py")
    tree = _scratch_copy(work / f"{stem}.tree")  # one per module: sessions may run side by side
    cfg, session = work / f"{stem}.toml", work / f"{stem}.sqlite"
    sock = work / f"{stem}.sock"
    cfg.write_text(config(args.module, args.timeout, sock))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    # pytest runs in forks of one process that imported torch once (tools/forkserver.py)
    sock.unlink(missing_ok=True)
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "forkserver.py"), "serve", str(sock)], cwd=tree, env=env
    )
    try:
        _wait_for(sock)
        _session(args, tree, env, cfg, session, bin_dir)
    finally:
        server.terminate()
        server.wait()
    return 0


def _annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) of every annotation, as (line, column) pairs."""
    spans = []
    for node in ast.walk(ast.parse(source)):
        notes = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            notes += [x.annotation for x in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg] if x]
            notes.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            notes.append(node.annotation)
        for n in notes:
            if n is not None and n.end_lineno is not None and n.end_col_offset is not None:
                spans.append(((n.lineno, n.col_offset), (n.end_lineno, n.end_col_offset)))
    return spans


def _skip_annotations(session: Path, module: Path) -> None:
    """Mark mutants inside annotations as skipped: every core module starts with
    ``from __future__ import annotations``, so annotations are strings nobody evaluates and
    ``Tensor | None`` -> ``Tensor - None`` cannot change behaviour."""
    source = module.read_text()
    if "from __future__ import annotations" not in source:
        return
    spans = _annotation_spans(source)
    with sqlite3.connect(session) as db:
        rows = db.execute(
            "SELECT s.job_id, s.start_pos_row, s.start_pos_col FROM mutation_specs s "
            "WHERE s.job_id NOT IN (SELECT job_id FROM work_results)"
        ).fetchall()
        skipped = [(job,) for job, row, col in rows if any(a <= (row, col) < b for a, b in spans)]
        db.executemany(
            "INSERT INTO work_results (worker_outcome, output, test_outcome, diff, job_id) "
            "VALUES ('SKIPPED', 'inside an annotation (never evaluated)', NULL, NULL, ?)",
            skipped,
        )
    print(f"mutate: {len(skipped)} mutants inside annotations skipped", flush=True)


def _sample(session: Path, n: int, seed: int) -> None:
    """Keep ``n`` of the pending mutants, drawn with ``random.Random(seed)``; mark the rest skipped.

    For modules with more mutants than a session can run: the score of a uniform sample
    estimates the module's. Mutants are ordered by position and operator before the draw
    (cosmic-ray's job ids are random), so the same seed on the same source draws the same set."""
    with sqlite3.connect(session) as db:
        pending = [
            job
            for (job,) in db.execute(
                "SELECT job_id FROM mutation_specs WHERE job_id NOT IN (SELECT job_id FROM work_results) "
                "ORDER BY start_pos_row, start_pos_col, end_pos_row, end_pos_col, operator_name, occurrence"
            )
        ]
        keep = set(random.Random(seed).sample(pending, min(n, len(pending))))
        db.executemany(
            "INSERT INTO work_results (worker_outcome, output, test_outcome, diff, job_id) "
            "VALUES ('SKIPPED', ?, NULL, NULL, ?)",
            [(f"not in the sample (--sample {n} --seed {seed})", job) for job in pending if job not in keep],
        )
    print(f"mutate: {len(keep)} of {len(pending)} mutants sampled (seed {seed})", flush=True)


def _wait_for(sock: Path) -> None:
    for _ in range(600):
        if sock.exists():
            return
        time.sleep(0.5)
    raise RuntimeError(f"mutate: the test server never opened {sock}")


def _session(
    args: argparse.Namespace, tree: Path, env: dict[str, str], cfg: Path, session: Path, bin_dir: Path
) -> None:
    if args.recheck and session.exists():
        with sqlite3.connect(session) as db:  # survivors become pending work again
            db.execute("DELETE FROM work_results WHERE test_outcome = 'SURVIVED'")
        _skip_annotations(session, tree / args.module)
    elif args.fresh or not session.exists():
        session.unlink(missing_ok=True)
        run(tree, env, str(bin_dir / "cosmic-ray"), "init", str(cfg), str(session))
        run(tree, env, str(bin_dir / "cr-filter-operators"), str(session), str(cfg))
        _skip_annotations(session, tree / args.module)
        if args.sample is not None:
            _sample(session, args.sample, args.seed)
        # the unmutated tests must pass, or every mutant would count as killed
        run(tree, env, str(bin_dir / "cosmic-ray"), "baseline", str(cfg))
    run(tree, env, str(bin_dir / "cosmic-ray"), "exec", str(cfg), str(session))
    run(tree, env, str(bin_dir / "cr-report"), "--show-pending", str(session))


if __name__ == "__main__":
    sys.exit(main())
