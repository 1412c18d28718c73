"""Smoke tests of the Hugging Face tools: the guide's worked example and the GPT-2 benchmark row."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))


@pytest.mark.slow
def test_hf_train_quick_trains_exact_loop_and_trainer() -> None:
    pytest.importorskip("transformers")
    import hf_train

    rows = hf_train.main(["--quick"])["rows"]
    assert set(rows) == {"exact", "loop@0.7", "trainer@0.7"}
    for name in ("loop@0.7", "trainer@0.7"):
        assert rows[name]["frontend"] == "export" and rows[name]["sampled"] > 0
        assert rows[name]["planned_fraction"] <= 0.7
        assert 0 < rows[name]["held_out_bits_per_byte"] < 8.5  # random bytes cost 8 bits


@pytest.mark.slow
def test_bench_gpt2_workload_is_captured_by_export(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    import bench

    out = tmp_path / "bench.json"
    argv = ["--quick", "--models", "gpt2", "--budgets", "0.7", "--memory-steps", "0", "--rounds", "1"]
    result = bench.main([*argv, "--steps", "1", "--warmup", "0", "--out", str(out)])
    approx = next(r for r in result["rows"] if r["variant"] == "approx@0.7")
    assert approx["info"]["frontend"] == "export" and approx["info"]["capture_s"] > 0
    assert approx["flop_fraction"] <= 0.7 * 1.01
    assert [r["variant"] for r in result["rows"]] == ["exact", "approx@0.7"]
