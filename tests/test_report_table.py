"""The report table against text written out by hand, including rows decided by overrides.

Every number below was worked out on paper from the node shapes (2·M·N·P per product,
three products per linear node), not with the report's own formatting helpers.
"""

from __future__ import annotations

import re

import torch

import approxcompile
from approxcompile import ApproxConfig, NodeOverride
from approxcompile.plan import Plan
from approxcompile.report import Report, report
from tests.models import mlp
from tests.plans import linear_plan

_linear = linear_plan


# fc1: 3 x 2·64·784·128 = 38,535,168 (38.5M), first node, exact.
# fc2: 3 x 2·64·128·128 = 6,291,456 (6.29M); keep 0.5 fixed by an override: k = 64, products
#      3,145,728 plus overhead 500,000 + 10·64 = 3,646,368 (3.65M).
# fc3: 3 x 2·64·128·10 = 491,520 (492K), exact by override.
# fc4: 3 x 2·64·32·10 = 122,880 (123K), no reason recorded: the allocation left it exact.
# dense 45,541,024 (45.5M) with 100,000 outside; planned 42,895,936 (42.9M) = 0.94192 of
# dense; counted (no overhead) 42,395,296 (42.4M).
NODES = (
    _linear("fc1", 64, 784, 128, reason="first candidate node (kept exact, as in the paper)"),
    _linear(
        "fc2",
        64,
        128,
        128,
        fixed_keep=0.5,
        keep=0.5,
        k=64,
        est_error=0.02,
        settings_source="module_name 'fc2'",
        overhead_fixed=500_000,
        overhead_per_kept=10,
    ),
    _linear(
        "fc3",
        64,
        128,
        10,
        reason="left exact by override (module_name 'fc3')",
        settings_source="module_name 'fc3'",
    ),
    _linear("fc4", 64, 32, 10),
)
PLAN = Plan(budget=0.95, method="crs", nodes=NODES, other_flops=100_000)

TABLE = """\
approxcompile plan: method=crs, budget=0.95
------------------------------------------------------------------------------------------------------------------------------
node  op      shapes                        n  dense  keep      k/n  approx      err  method  decided by         exact because
------------------------------------------------------------------------------------------------------------------------------
fc1   Linear  64x784 @ 128x784 -> 64x128  784  38.5M     1  784/784   38.5M        -  -       exclusions         first candidate node (kept exact, as in the paper)
fc2   Linear  64x128 @ 128x128 -> 64x128  128  6.29M  0.50   64/128   3.65M  2.0e-02  topk    module_name 'fc2'
fc3   Linear  64x128 @ 10x128 -> 64x10    128   492K     1  128/128    492K        -  -       module_name 'fc3'  left exact by override (module_name 'fc3')
fc4   Linear  64x32 @ 10x32 -> 64x10       32   123K     1    32/32    123K        -  -       allocation         kept exact by the allocation
------------------------------------------------------------------------------------------------------------------------------
dense training FLOPs      45.5M
planned FLOPs (overhead)  42.9M  = 0.942 of dense (budget 0.95)
counted by FlopCounter    42.4M  (products, no overhead)
outside matmul/conv       100K
sampled nodes             1 / 4 candidates"""  # noqa: E501


def test_table_with_override_rows_is_the_hand_written_text() -> None:
    # The table and totals; the lines after them (frontend, plan warnings) have tests of their own.
    assert str(report(PLAN)).splitlines()[: len(TABLE.splitlines())] == TABLE.splitlines()


def test_totals_in_the_json_are_the_hand_computed_numbers() -> None:
    totals = report(PLAN).to_dict()["totals"]
    assert totals == {
        "dense_flops": 45_541_024,
        "planned_flops": 42_895_936,
        "counted_flops": 42_395_296,
        "other_flops": 100_000,
        "fraction": 42_895_936 / 45_541_024,
        "sampled": 1,
        "candidates": 4,
    }
    fc2 = report(PLAN).to_dict()["nodes"][1]
    assert (fc2["fixed_keep"], fc2["keep"], fc2["k"], fc2["sampled"], fc2["reason"]) == (
        0.5,
        0.5,
        64,
        True,
        None,
    )
    assert fc2["approx_flops"] == {
        "forward": 1_048_576,
        "input_grad": 1_048_576,
        "weight_grad": 1_048_576,
        "total": 3_145_728,
    }
    assert (fc2["overhead"], fc2["cost"]) == (500_640, 3_646_368)
    assert fc2["settings_source"] == "module_name 'fc2'"


def test_headers_name_the_mode_and_the_scores() -> None:
    backward = Plan(budget=0.5, method="crs", nodes=(), other_flops=0, mode="backward", scores="weights")
    first = str(report(backward)).splitlines()[0]
    assert first == (
        "approxcompile plan: method=crs, budget=0.5, mode=backward "
        "(forward exact; k/n is dX's output features), scores=weights"
    )
    assert "(no matmul / linear / conv nodes)" in str(report(backward))


def test_repr_counts_sampled_nodes() -> None:
    assert repr(report(PLAN)) == "Report(budget=0.95, method='crs', sampled=1/4, fraction=0.942)"


def test_from_dict_rebuilds_every_field() -> None:
    again = Report.from_dict(report(PLAN).to_dict()).plan
    assert again == PLAN
    assert again.nodes[1].settings_source == "module_name 'fc2'" and again.nodes[1].fixed_keep == 0.5


def _cells(text: str, name: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith(name + " "))
    return re.split(r"\s{2,}", line.strip())


def test_optimize_with_overrides_reports_each_row_by_its_decision() -> None:
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    config = (
        ApproxConfig()
        .set_module_name("layers.1", NodeOverride(keep=0.5))
        .set_module_name("layers.2", NodeOverride(exact=True))
    )
    fast = approxcompile.optimize(mlp(), 0.95, example_inputs=(x,), config=config)
    text = str(approxcompile.report(fast))
    # layers.1: 16 rows, 128 -> 128. Dense 3 x 2·16·128·128 = 1,572,864 (1.57M); keep 0.5 is
    # k = 64: products 786,432, overhead 2·128·(16+128) + 2·128 = 37,120 fixed and
    # 2·(16+128) = 288 per kept column (18,432): 841,984 (842K).
    cells = _cells(text, "layers.1")
    assert cells[:8] == [
        "layers.1",
        "Linear",
        "16x128 @ 128x128 -> 16x128",
        "128",
        "1.57M",
        "0.50",
        "64/128",
        "842K",
    ]
    assert re.fullmatch(r"\d\.\de-\d\d", cells[8]) and len(cells) == 11  # an error, no reason
    assert cells[9:] == ["topk", "module_name 'layers.1'"]
    assert _cells(text, "layers.2")[-1] == "left exact by override (module_name 'layers.2')"
    assert _cells(text, "layers.0")[-1] == "first candidate node (kept exact, as in the paper)"
    assert _cells(text, "layers.3")[-1] == "last candidate node (kept exact, as in the paper)"
    assert "sampled nodes             1 / 4 candidates" in text


def test_from_dict_reads_a_file_written_before_mode_rows_timing_and_scores() -> None:
    data = report(PLAN).to_dict()
    for key in ("mode", "scores"):
        del data[key]
    for node in data["nodes"]:
        for key in ("mode", "rows", "timing"):
            del node[key]
    again = Report.from_dict(data).plan
    assert (again.mode, again.scores) == ("forward", "activations")
    assert [(n.mode, n.rows, n.timing) for n in again.nodes] == [("forward", 0, ())] * 4
    assert again == PLAN


def test_to_json_indents_two_spaces_by_default() -> None:
    lines = report(PLAN).to_json().splitlines()
    assert lines[0] == "{" and lines[1] == '  "schema": 1,'
    assert report(PLAN).to_json(indent=None).startswith('{"schema": 1, "budget": 0.95, "method": "crs"')
