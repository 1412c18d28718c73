"""Smoke test of ``tools/demo.py --quick``: both variants train, and the sampled one spends less."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "tools" / "demo.py"


@pytest.mark.slow
def test_demo_quick_runs_and_saves_flops(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    demo = runpy.run_path(str(DEMO))  # not as __main__: only the definitions
    png = tmp_path / "demo.png"
    results = demo["main"](["--quick", "--models", "mlp", "--budget", "0.4", "--plot", str(png)])
    exact, fast = results
    assert (exact.variant, fast.variant) == ("exact", "budget=0.4")
    # Measured by FlopCounterMode on a real step, so this checks that the rewrite fired.
    assert fast.flops_per_step <= 0.45 * exact.flops_per_step
    assert 0.0 <= fast.accuracy <= 1.0
    out = capsys.readouterr().out
    assert "approximation report" in out and "budget=0.4" in out
    # the summary: speedup, accuracy difference with its uncertainty, per-epoch accuracy, curves
    assert "x wall-clock training speedup" in out and "at two standard errors of a 256-image test set" in out
    assert len(fast.epoch_accuracy) == 1 and fast.epoch_accuracy[-1] == fast.accuracy
    assert re.search(rf"\n\s+1\s+{exact.accuracy:.2%}\s+{fast.accuracy:.2%}\n", out)
    assert png.read_bytes()[:4] == b"\x89PNG"
