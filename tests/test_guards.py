"""Guard rails and progress: plan warnings with their fixes, the logger, the progress bar, the plot."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import approxcompile
from approxcompile import ApproxConfig, PlanWarning
from approxcompile.cli import main
from approxcompile.guards import HIGH_ERROR, check, sweep
from approxcompile.progress import Bar, enabled
from tests.models import mlp


def _quick_start_mlp() -> nn.Module:
    """The guide's quick-start model: 784-512-512-512-10."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
        nn.Linear(512, 10),
    )  # fmt: skip


@pytest.fixture(scope="module")
def quick_start() -> tuple[torch.fx.GraphModule, list[warnings.WarningMessage]]:
    x = torch.randn(64, 784, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = approxcompile.optimize(_quick_start_mlp(), 0.4, example_inputs=(x,))
    return fast, [w for w in caught if issubclass(w.category, PlanWarning)]


def test_quick_start_mlp_warns_about_the_noisy_node_and_the_exact_first_layer(quick_start) -> None:
    fast, caught = quick_start
    plan = approxcompile.report(fast).plan
    noisy = [n for n in plan.nodes if n.sampled and n.est_error > HIGH_ERROR]
    assert noisy, "the quick-start plan at budget 0.4 samples a node to an error above 0.5"
    texts = [str(w.message) for w in caught]
    assert len(texts) == 2
    high, share = texts
    assert f"'{noisy[0].name}' keeps {noisy[0].k}/512" in high
    sensible = float(high.split("fix: budget=")[1].split()[0])
    # The named budget really keeps every node under the threshold, and a smaller one does not.
    points = {p.budget: p for p in sweep(plan)}
    assert points[sensible].max_error <= HIGH_ERROR
    assert all(p.max_error > HIGH_ERROR for b, p in points.items() if 0.4 < b < sensible)
    first = plan.nodes[0]
    assert first.reason is not None and first.reason.startswith("first candidate")
    assert f"'{first.name}' 34% of dense (first candidate node)" in share
    assert "ApproxConfig(exclude_first_last=False)" in share
    report = str(approxcompile.report(fast))
    assert report.count("\nwarning: ") == 2  # the table repeats them


def test_sweep_matches_the_allocation_at_the_planned_budget(quick_start) -> None:
    fast, _ = quick_start
    plan = approxcompile.report(fast).plan
    at = {p.budget: p for p in sweep(plan, budgets=(0.4, 1.0))}
    assert at[0.4].total_error == pytest.approx(sum(n.est_error for n in plan.nodes if n.sampled))
    assert at[0.4].fraction == pytest.approx(plan.fraction)
    assert at[1.0].total_error == 0.0 and at[1.0].sampled == 0
    errors = [p.total_error for p in sweep(plan)]
    assert errors == sorted(errors, reverse=True)  # more budget, never more planned error


def test_a_comfortable_plan_has_no_warnings() -> None:
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlanWarning)
        fast = approxcompile.optimize(
            mlp(), 0.9, example_inputs=(x,), config=ApproxConfig(exclude_first_last=False)
        )
    assert check(approxcompile.report(fast).plan) == ()
    assert "warning:" not in str(approxcompile.report(fast))


def test_logger_names_each_pass_and_its_time(caplog: pytest.LogCaptureFixture) -> None:
    x = torch.randn(16, 64)
    with caplog.at_level(logging.INFO, logger="approxcompile"):
        approxcompile.optimize(mlp(), 0.9, example_inputs=(x,))
    passes = [r.getMessage().split(":")[0] for r in caplog.records if r.name == "approxcompile"]
    assert passes == [
        "capture", "shapes", "cost", "other-flops", "exclusions", "sensitivity", "selection", "rewrite",
        "verify", "optimize",
    ]  # fmt: skip
    assert "sensitivity: " in caplog.text and "s (measured=" in caplog.text


def test_progress_bar_draws_only_when_asked_or_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    quiet, forced, tty = io.StringIO(), io.StringIO(), Tty()
    for stream, flag in ((quiet, None), (forced, True), (tty, False)):
        with enabled(flag), Bar("sensitivity", 3, stream=stream) as bar:
            for _ in range(3):
                bar.update()
    assert quiet.getvalue() == "" and tty.getvalue() == ""
    assert forced.getvalue().endswith("[sensitivity] ######################## 3/3 nodes   0.0s\n")


def test_cli_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "plan.png"
    args = [
        "inspect",
        "tests.models:cnn",
        "--input-shape",
        "16,1,12,12",
        "--budget",
        "0.5",
        "--plot",
        str(out),
    ]
    assert main(args) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    assert f"approxcompile: wrote {out}" in capsys.readouterr().err


def test_cli_warnings_are_one_line_each_and_quiet_drops_them(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["inspect", "tests.models:mlp", "--input-shape", "16,64", "--budget", "0.3"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert err.startswith("approxcompile: warning: ") and "fix: " in err and "PlanWarning" not in err
    assert main([*args, "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err
