"""tools/time_to_quality.py: its curve arithmetic, and a --quick run end to end (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import time_to_quality as ttq

CURVE = [
    {"step": 0, "wall_s": 0.0, "flops": 0.0, "val_loss": 5.0},
    {"step": 10, "wall_s": 10.0, "flops": 1.0, "val_loss": 3.0},
    {"step": 20, "wall_s": 20.0, "flops": 2.0, "val_loss": 2.0},
]


def test_time_to_a_loss_interpolates_between_evaluations() -> None:
    assert ttq.time_to(CURVE, 4.0) == pytest.approx(5.0)
    assert ttq.time_to(CURVE, 2.5) == pytest.approx(15.0)
    assert ttq.time_to(CURVE, 2.0) == pytest.approx(20.0)
    assert ttq.time_to(CURVE, 1.9) is None  # never reached
    assert ttq.loss_at(CURVE, 15.0) == pytest.approx(2.5)
    assert ttq.loss_at(CURVE, 99.0) == 2.0


def test_the_learning_rate_warms_up_then_decays() -> None:
    f = [ttq.lr_factor(s, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.2) and max(f) == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.1, abs=0.01)


@pytest.mark.slow
def test_quick_run_writes_the_headline_json_and_the_plots(tmp_path: Path) -> None:
    assert ttq.main(["--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    head = json.loads((tmp_path / "time_to_quality.json").read_text())
    assert set(head) == {"workload", "seeds", "exact", "best"}
    assert set(head["exact"]) == {"final_val_loss", "wall_s"}
    assert set(head["best"]) == {"recipe", "final_val_loss", "wall_s", "time_to_exact_final_val_loss_s"}
    runs = json.loads((tmp_path / "time_to_quality_runs.json").read_text())
    seed = runs["seeds"][0]["runs"]
    assert list(seed)[0] == "exact" and len(seed) == 4
    anneal = next(v for k, v in seed.items() if k.startswith("anneal"))
    assert anneal["budgets"][-1] == 1.0 and anneal["budgets"][0] < 0.5  # sampled, then exact at the end
    const = next(v for k, v in seed.items() if k.startswith("constant"))
    assert const["flops"] < 0.5 * seed["exact"]["flops"]  # the planned FLOPs really were cut
    assert (tmp_path / "figures" / "ttq-wallclock.png").stat().st_size > 1000
    assert (tmp_path / "figures" / "ttq-flops.png").stat().st_size > 1000


@pytest.mark.slow
def test_mnist_cells_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import ttq_mnist

    out = tmp_path / "mnist.json"
    assert ttq_mnist.main(["--quick", "--models", "mlp", "--fraction", "0.5", "--out", str(out)]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert 2 < run["replans"] <= 17  # 0.2, then up to exact in steps of at least 1/20
    assert set(run["test_accuracy"]) == {"exact", "scheduled"} and run["test_accuracy"]["exact"] > 0.5
    assert "mlp: accuracy scheduled - exact" in capsys.readouterr().out
