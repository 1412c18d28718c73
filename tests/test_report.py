"""report(): the table shows every decision and reason, the JSON carries the whole plan."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

import approxcompile
from approxcompile.plan import META_KEY, NodePlan, Plan
from approxcompile.report import Report, format_shapes, human_flops, report
from tests.models import mlp
from tests.plans import linear_plan


def _linear(name: str, m: int, n: int, p: int, **kw: object) -> NodePlan:
    return linear_plan(
        name,
        m,
        n,
        p,
        overhead_fixed=1000,
        overhead_per_kept=10,
        **kw,
    )


FC1 = _linear("fc1", 64, 784, 128, reason="first candidate node (kept exact, as in the paper)")
FC2 = _linear(
    "fc2", 64, 128, 128, keep=0.35, k=45, est_error=0.031, sensitivity=((0.25, 0.05), (0.5, 0.02), (1.0, 0.0))
)
FC3 = _linear("fc3", 64, 128, 10, reason="last candidate node (kept exact, as in the paper)")
PLAN = Plan(budget=0.4, method="topk", nodes=(FC1, FC2, FC3), other_flops=12345)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 128), nn.Linear(128, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _planned(plan: Plan = PLAN) -> torch.fx.GraphModule:
    gm = torch.fx.symbolic_trace(Net())
    gm.meta[META_KEY] = plan
    return gm


def _rows(text: str) -> dict[str, list[str]]:
    """Table rows keyed by node name, split into cells on runs of 2+ spaces."""
    names = {"fc1", "fc2", "fc3", "layers.0", "layers.1", "layers.2", "layers.3"}
    rows = {}
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] in names:
            rows[cells[0]] = cells
    return rows


def test_module_without_plan_is_rejected() -> None:
    with pytest.raises(ValueError, match="not produced by approxcompile.optimize"):
        report(torch.fx.symbolic_trace(Net()))
    with pytest.raises(ValueError, match="not produced by approxcompile.optimize"):
        report(Net())


def test_accessors() -> None:
    rep = report(_planned())
    assert rep.plan is PLAN
    assert rep.nodes == (FC1, FC2, FC3)
    assert rep.sampled == (FC2,)
    assert report(PLAN).plan is PLAN


def test_sampled_row_shows_keep_k_cost_and_error() -> None:
    row = _rows(str(report(_planned())))["fc2"]
    assert row == [
        "fc2",
        "Linear",
        "64x128 @ 128x128 -> 64x128",
        "128",
        "6.29M",  # 3 x 2·64·128·128 = 6,291,456
        "0.35",
        "45/128",
        "2.21M",  # 3 x (2,097,152·45 // 128) + 1000 + 10·45 = 2,213,290
        "3.1e-02",
        "topk",
        "allocation",
    ]


def test_exact_rows_show_their_reason_and_no_error() -> None:
    rows = _rows(str(report(_planned())))
    assert rows["fc1"][-4:] == ["-", "-", "exclusions", "first candidate node (kept exact, as in the paper)"]
    assert rows["fc3"][-4:] == ["-", "-", "exclusions", "last candidate node (kept exact, as in the paper)"]
    assert rows["fc3"][5:7] == ["1", "128/128"]


def test_columns_are_aligned_and_long_reasons_do_not_widen_them() -> None:
    text = str(report(_planned()))
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("node"))
    reason_col = header.index("exact because")
    for name in ("fc1", "fc3"):
        line = next(line for line in lines if line.startswith(name + " "))
        assert line[reason_col:].startswith("first" if name == "fc1" else "last")
    long = PLAN.nodes[0].with_(reason="x" * 300)
    long_text = str(report(_planned(Plan(budget=0.4, method="topk", nodes=(long, FC2, FC3), other_flops=0))))
    rule = lines[1]
    assert set(rule) == {"-"} and long_text.splitlines()[1] == rule
    assert "x" * 300 in long_text


# By hand: fc1 3 x 2·64·784·128 = 38,535,168; fc2 6,291,456 dense, 2,213,290 planned (with
# overhead), 2,211,840 counted; fc3 3 x 2·64·128·10 = 491,520; 12,345 outside.
DENSE, PLANNED, COUNTED = 45_330_489, 41_252_323, 41_250_873


def test_totals() -> None:
    text = str(report(_planned()))
    assert "dense training FLOPs      45.3M\n" in text
    assert "planned FLOPs (overhead)  41.3M  = 0.910 of dense (budget 0.4)\n" in text
    assert "counted by FlopCounter    41.3M  (products, no overhead)\n" in text
    assert "outside matmul/conv       12.3K\n" in text
    assert "sampled nodes             1 / 3 candidates" in text
    assert "note:" not in text
    noted = Plan(budget=1.0, method="topk", nodes=(), other_flops=10, note="no candidate nodes")
    text = str(report(noted))
    assert "note: no candidate nodes" in text and "0 / 0 candidates" in text


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0"),
        (999, "999"),
        (1500, "1.5K"),
        (1_234_567, "1.23M"),
        (2.5e9, "2.5G"),
        (3e12, "3T"),
        (4e15, "4000T"),
        (999_999, "1M"),
        (999.7, "1K"),
        (999.4e12, "999T"),
        (999.5e12, "1000T"),  # three significant digits would print 1e+03
        (999.7e12, "1000T"),
        (1e15, "1000T"),
        (999_500, "1M"),  # the unit switches at 0.9995 of it, inclusive
        (999_499, "999K"),
        (-2500, "-2.5K"),
    ],
)
def test_human_flops(n: float, text: str) -> None:
    assert human_flops(n) == text


def test_conv_shapes_use_star() -> None:
    conv = FC1.with_(
        kind="conv", op="Conv2d", shapes=((8, 3, 32, 32), (16, 3, 3, 3)), out_shape=(8, 16, 32, 32)
    )
    assert format_shapes(conv) == "8x3x32x32 * 16x3x3x3 -> 8x16x32x32"


def test_json_round_trips_and_totals_are_the_hand_computed_ones() -> None:
    rep = report(_planned())
    data = json.loads(rep.to_json())
    assert data["schema"] == 1 and (data["budget"], data["method"], data["mode"]) == (0.4, "topk", "forward")
    assert (data["scores"], data["note"]) == ("activations", None)
    assert data["totals"] == {
        "dense_flops": DENSE,
        "planned_flops": PLANNED,
        "counted_flops": COUNTED,
        "other_flops": 12345,
        "fraction": PLANNED / DENSE,
        "sampled": 1,
        "candidates": 3,
    }
    assert [n["name"] for n in data["nodes"]] == ["fc1", "fc2", "fc3"]
    assert json.loads(rep.to_json(indent=None)) == data and "\n" not in rep.to_json(indent=None)
    assert Report.from_dict(data).plan == PLAN


def test_json_node_fields() -> None:
    data = report(_planned()).to_dict()
    keys = {"schema", "budget", "method", "mode", "scores", "frontend", "frontend_reason", "note", "totals"}
    assert set(data) == keys | {"nodes", "warnings"}
    fc2 = data["nodes"][1]
    assert set(fc2) == {
        "name", "kind", "op", "shapes", "out_shape", "inner", "keep", "k", "sampled", "method", "min_k",
        "fixed_keep", "est_error", "reason", "settings_source", "mode", "rows", "dense_flops", "approx_flops",
        "overhead", "overhead_fixed", "overhead_per_kept", "cost", "sensitivity", "timing",
        "row_keep", "row_fixed_keep", "row_sensitivity", "row_overhead_fixed", "row_overhead_per_kept",
    }  # fmt: skip
    assert fc2["sampled"] is True and fc2["k"] == 45 and fc2["reason"] is None
    assert fc2["dense_flops"] == {
        "forward": 2_097_152,
        "input_grad": 2_097_152,
        "weight_grad": 2_097_152,
        "total": 6_291_456,
    }
    assert fc2["approx_flops"] == {
        "forward": 737_280,
        "input_grad": 737_280,
        "weight_grad": 737_280,
        "total": 2_211_840,
    }
    assert fc2["overhead"] == 1000 + 10 * 45
    assert fc2["cost"] == 2_213_290
    assert (fc2["shapes"], fc2["out_shape"], fc2["inner"], fc2["keep"]) == (
        [[64, 128], [128, 128]],
        [64, 128],
        128,
        0.35,
    )
    assert (fc2["est_error"], fc2["method"], fc2["min_k"], fc2["fixed_keep"]) == (0.031, "topk", 1, None)
    assert (fc2["settings_source"], fc2["mode"], fc2["rows"], fc2["timing"]) == ("global", "forward", 0, [])
    assert fc2["sensitivity"] == [[0.25, 0.05], [0.5, 0.02], [1.0, 0.0]]
    assert data["nodes"][0]["overhead"] == 0 and data["nodes"][0]["sampled"] is False


def test_report_of_optimized_mlp() -> None:
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    gm = approxcompile.optimize(mlp(), 0.4, example_inputs=(x,))
    rep = report(gm)
    plan = gm.meta[META_KEY]
    rows = _rows(str(rep))
    assert set(rows) == {"layers.0", "layers.1", "layers.2", "layers.3"}
    assert rep.sampled, "the MLP at budget 0.4 must sample something"
    for node in rep.sampled:
        assert rows[node.name][5:7] == [f"{node.keep:.2f}", f"{node.k}/{node.inner}"]
    assert rows["layers.0"][-1] == plan.nodes[0].reason
    assert rep.to_dict()["totals"]["planned_flops"] == plan.approx_flops <= 0.4 * plan.dense_flops
