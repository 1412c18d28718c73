"""tools/time_to_quality.py: its curve arithmetic, and a --quick run end to end (slow)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import time_to_quality as ttq
import torch

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


def test_recipes_take_a_budget_a_fraction_and_a_step_multiplier() -> None:
    R = ttq.Recipe
    assert ttq.parse_recipes("anneal, anneal:1.25,constant@0.3:2, cooldown@0.2/0.25:1.1,cooldown/0.5") == [
        R("anneal"),
        R("anneal", mult=1.25),
        R("constant", budget=0.3, mult=2.0),
        R("cooldown", budget=0.2, fraction=0.25, mult=1.1),
        R("cooldown", fraction=0.5),
    ]
    assert R("cooldown", 0.2, 0.25, 1.1).label(0.2, 330, 300) == "cooldown@0.2 last 0.25 x1.1 steps"
    assert R("anneal").label(0.2, 300, 300) == "anneal@0.2"
    with pytest.raises(SystemExit, match="unknown recipes"):
        ttq.parse_recipes("anneal,warmup")
    with pytest.raises(SystemExit, match="must be a number"):
        ttq.parse_recipes("anneal:x")
    for bad in ("anneal:0", "anneal@1.5", "cooldown/0", "constant@-1"):
        with pytest.raises(SystemExit, match="must be in"):
            ttq.parse_recipes(bad)


def test_min_keep_floors_the_keep_grid() -> None:
    grid = ttq.make_config(ttq.parse(["--min-keep", "0.1"])).keep_grid
    assert min(grid) == 0.1 and set(grid) < set(ttq.approxcompile.ApproxConfig().keep_grid)
    assert ttq.make_config(ttq.parse([])).keep_grid == ttq.approxcompile.ApproxConfig().keep_grid
    with pytest.raises(SystemExit, match="leaves no keep ratio"):
        ttq.make_config(ttq.parse(["--min-keep", "0.95"]))


def test_equal_steps_compares_at_exacts_last_step_not_the_recipes() -> None:
    exact = {"wall_s": 20.0, "curve": CURVE}
    longer = {
        "wall_s": 24.0,
        "steps": 30,
        "flops": 1.0,
        "curve": [*CURVE[:2], {**CURVE[2], "val_loss": 2.2}, {"step": 30, "wall_s": 24.0, "val_loss": 1.9}],
    }
    table = ttq.summarize([{"runs": {"exact": {**exact, "flops": 2.0}, "anneal@0.2 x1.5 steps": longer}}])
    row = table["anneal@0.2 x1.5 steps"]
    assert row["loss_vs_exact_equal_steps"] == pytest.approx(2.2 / 2.0 - 1)  # at step 20, not 30
    assert row["final_val_loss"] == 1.9 and row["steps"] == 30
    # it passes exact's final loss 2.0 between step 20 (20 s) and step 30 (24 s)
    assert row["time_to_exact_final_val_loss_s"] == pytest.approx(20.0 + 4.0 * (0.2 / 0.3))


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
def test_a_recipe_with_more_steps_reads_on_and_ends_exact(tmp_path: Path) -> None:
    argv = ["--quick", "--seeds", "1", "--recipes", "anneal:1.5,cooldown@0.3/0.5", "--out", str(tmp_path)]
    assert ttq.main(argv) == 0
    seed = json.loads((tmp_path / "time_to_quality_runs.json").read_text())["seeds"][0]["runs"]
    assert seed["cooldown@0.3 last 0.5"]["budgets"] == [0.3, 1.0]  # sampled, then exact at once
    (name,) = [k for k in seed if k.startswith("anneal")]
    assert name.endswith("x1.5 steps") and seed[name]["steps"] == 9 and seed["exact"]["steps"] == 6
    steps = [p["step"] for p in seed[name]["curve"]]
    assert 6 in steps and steps[-1] == 9  # evaluated at exact's last step and at its own
    assert seed[name]["budgets"][-1] == 1.0 and seed[name]["budgets"][0] < 0.5


@pytest.mark.slow
def test_mnist_cells_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import ttq_mnist

    out = tmp_path / "mnist.json"
    assert ttq_mnist.main(["--quick", "--models", "mlp", "--fraction", "0.5", "--out", str(out)]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert 2 < run["replans"] <= 17  # 0.2, then up to exact in steps of at least 1/20
    assert set(run["test_accuracy"]) == {"exact", "scheduled"} and run["test_accuracy"]["exact"] > 0.5
    assert "mlp: accuracy scheduled - exact" in capsys.readouterr().out


@pytest.mark.slow
def test_probe_trains_the_recipes_only_and_compares_with_the_given_exact_losses(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import ttq_probe

    argv = ["--quick", "--recipes", "anneal:1.5", "--seed-list", "0", "--exact", "99.0"]
    assert ttq_probe.main(argv) == 0
    rows = [
        json.loads(line[6:]) for line in capsys.readouterr().out.splitlines() if line.startswith("PROBE ")
    ]
    assert len(rows) == 1 and rows[0]["seed"] == 0  # the recipe only, no exact run
    assert rows[0]["recipe"].startswith("anneal@") and rows[0]["recipe"].endswith("x1.5 steps")
    assert rows[0]["reaches_exact_final"] is True and rows[0]["vs_exact_equal_steps_pct"] < 0
    with pytest.raises(SystemExit, match="seed 1 needs one"):
        ttq_probe.main(["--quick", "--seed-list", "1", "--exact", "2.0"])


@pytest.mark.slow
def test_mnist_cells_fused_optimizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--optimizer fused`` gives both models the cell's optimizer with PyTorch's fused kernels."""
    import replicate
    import ttq_mnist

    made: list[torch.optim.Optimizer] = []
    setup = replicate.SETUPS["mlp"]

    def spy(params: list[torch.nn.Parameter], fused: bool = False) -> torch.optim.Optimizer:
        made.append(setup.optimizer(params, fused=fused))
        return made[-1]

    monkeypatch.setitem(replicate.SETUPS, "mlp", dataclasses.replace(setup, optimizer=spy))
    out = tmp_path / "mnist.json"
    argv = ["--quick", "--models", "mlp", "--optimizer", "fused", "--schedule", "constant", "--budget", "0.6"]
    assert ttq_mnist.main([*argv, "--out", str(out)]) == 0
    assert len(made) == 2 and all(isinstance(o, torch.optim.Adam) and o.defaults["fused"] for o in made)
    record = json.loads(out.read_text())
    assert record["settings"]["optimizer"] == "fused"
    assert record["runs"][0]["test_accuracy"]["scheduled"] > 0.5


@pytest.mark.slow
def test_mnist_step_times(capsys: pytest.CaptureFixture[str]) -> None:
    import step_mnist

    assert (
        step_mnist.main(["mlp", "--budgets", "0.3", "--steps", "4", "--warmup", "1", "--optimizer", "fused"])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["exact", "budget"] and "exact/this 1.00x" in lines[0]
