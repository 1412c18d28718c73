"""The speed benchmark (tools/bench.py) runs end to end; its models and the paper-style reference behave.

No timing thresholds: wall-clock ratios belong in docs/performance.md, not in tests.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import shlex
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import approxcompile

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _tool(name: str) -> ModuleType:
    """Import a tools/ script as a module (tools/ is not a package; its scripts import each other)."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _tool("bench")


@pytest.fixture(scope="module")
def models() -> ModuleType:
    return _tool("bench_models")


@pytest.fixture(scope="module")
def paper() -> ModuleType:
    return _tool("paper_style")


def _check_result(
    result: dict, argv: list[str], out: Path, printed: str, names: list[str], variants: list[str]
) -> None:
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["command"].endswith("tools/bench.py " + shlex.join(argv))
    assert {"platform", "cpu_count", "torch", "threads"} <= set(result["machine"])
    rows = {(r["model"], r["variant"]): r for r in result["rows"]}
    assert set(rows) == {(m, v) for m in names for v in variants}
    for (model, variant), r in rows.items():
        assert f"| {model} | {variant} |" in printed
        for key in ("speedup_vs_exact", "speedup_vs_paper", "median_step_ms", "flop_fraction"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (model, variant, key)
        assert all(t > 0 for t in r["step_s"])
        if variant == "exact":
            assert r["speedup_vs_exact"] == 1.0 and r["flop_fraction"] == 1.0
        else:
            assert r["flop_fraction"] < 1.0  # the variant really samples
    assert result["command"] in printed


def test_quick_single_model(bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    argv = ["--quick", "--models", "mlp", "--budgets", "0.4", "--rounds", "1", "--steps", "1"]
    argv += ["--warmup", "0", "--memory-steps", "0", "--threads", "1", "--markdown", "--out", str(out)]
    result = bench.main(argv)
    printed = capsys.readouterr().out
    _check_result(result, argv, out, printed, ["mlp"], ["exact", "paper@0.4", "approx@0.4"])
    assert all(r["peak_mem_mb"] is None for r in result["rows"])  # --memory-steps 0 skips memory
    assert "| n/a |" in printed


@pytest.mark.slow
def test_quick_everything(bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    argv = ["--quick", "--threads", "1", "--markdown", "--out", str(out)]
    result = bench.main(argv)
    printed = capsys.readouterr().out
    variants = ["exact", "paper@0.4", *(f"approx@{b}" for b in (0.2, 0.4, 0.6, 0.8))]
    _check_result(result, argv, out, printed, ["mlp", "cnn", "transformer"], variants)
    for r in result["rows"]:
        assert "error" not in r["memory"], r["memory"]
        assert isinstance(r["peak_mem_mb"], float) and r["peak_mem_mb"] >= 0
    # paper-style samples the attention products too, not only the linears
    paper_tf = next(r for r in result["rows"] if r["model"] == "transformer" and r["variant"] == "paper@0.4")
    approx_tf = next(
        r for r in result["rows"] if r["model"] == "transformer" and r["variant"] == "approx@0.4"
    )
    assert set(paper_tf["info"]["sampled"]) == set(approx_tf["info"]["sampled"])
    assert paper_tf["info"]["left_exact"] == {}


def test_bad_arguments(bench: ModuleType) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--models", "resnet"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--budgets", "0.4,1.5"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--pinned", "0"])


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_models_trace_and_train(models: ModuleType, name: str) -> None:
    w = models.build(name, "quick")
    gm = fx.symbolic_trace(w.model)
    torch.testing.assert_close(gm(w.x), w.model(w.x))
    assert w.model(w.x).shape == (w.x.shape[0], models.CLASSES)
    assert models.build(name, "quick").x.equal(w.x)  # a pure function of (name, size, seed)


def test_full_sizes_are_the_issues(models: ModuleType) -> None:
    """Shapes only (building the full models is cheap; running them is not)."""
    mlp, shape = models.mlp("full")
    assert [layer.in_features for layer in mlp.layers] == [784, 4096, 4096, 4096] and shape == (256, 784)
    cnn, shape = models.cnn("full")
    assert [c.out_channels for c in cnn.convs] == [128] * 4 and shape == (32, 3, 32, 32)
    tf, shape = models.transformer("full")
    assert len(tf.layers) == 4 and tf.layers[0].fc1.out_features == 2048 and tf.layers[0].attn.heads == 8
    assert shape == (8, 128, 512)


def test_paper_style_follows_the_plan(models: ModuleType, paper: ModuleType) -> None:
    w = models.build("transformer", "quick")
    fast = approxcompile.optimize(copy.deepcopy(w.model), 0.2, example_inputs=(w.x,))
    plan = fast.meta["approxcompile"]
    result = paper.paper_style(w.model, plan)
    planned = {n.name: n.keep for n in plan.nodes if n.sampled}
    assert result.sampled == planned and not result.left_exact
    assert any(".matmul" in name for name in planned)  # the attention products are in the plan
    model = result.model
    assert sorted(model.state_dict()) == sorted(w.model.state_dict())
    assert all(p is not q for p, q in zip(model.parameters(), w.model.parameters(), strict=True))

    model.eval()
    torch.testing.assert_close(model(w.x), w.model(w.x), rtol=0, atol=0)  # exact in eval
    model.train()
    assert not torch.allclose(model(w.x), w.model(w.x))  # sampled in train
    F.cross_entropy(model(w.x), w.y).backward()
    name, keep = next((n, k) for n, k in planned.items() if ".matmul" not in n)
    grad = model.get_submodule(name).weight.grad
    assert grad is not None
    touched = int((grad.abs().sum(dim=0) > 0).sum())  # unsampled input columns get no gradient
    assert touched == approxcompile.plan.kept_count(keep, grad.shape[1])


def test_paper_style_conv(models: ModuleType, paper: ModuleType) -> None:
    w = models.build("cnn", "quick")
    fast = approxcompile.optimize(copy.deepcopy(w.model), 0.4, example_inputs=(w.x,))
    model = paper.apply_paper_style(w.model, fast.meta["approxcompile"])
    swapped = [m for m in model.modules() if isinstance(m, paper.PaperConv2d)]
    assert swapped and all(0 < m.keep < 1 for m in swapped)
    model.eval()
    torch.testing.assert_close(model(w.x), w.model(w.x), rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_and_autocast_variants(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    names = ["exact", "approx@0.4", "exact+compile", "approx@0.4+compile", "approx@0.4+bf16"]
    argv = ["--quick", "--models", "mlp", "--variants", ",".join(names), "--rounds", "1", "--steps", "1"]
    argv += ["--warmup", "1", "--memory-steps", "0", "--threads", "1", "--out", str(out)]
    rows = {r["variant"]: r for r in bench.main(argv)["rows"]}
    assert list(rows) == names
    compiled = rows["approx@0.4+compile"]
    # vs base: over the exact model compiled the same way, not over eager exact
    want = rows["exact+compile"]["median_step_ms"] / compiled["median_step_ms"]
    assert compiled["speedup_vs_base"] == pytest.approx(want)
    assert rows["approx@0.4+bf16"]["speedup_vs_base"] == rows["approx@0.4+bf16"]["speedup_vs_exact"]
    assert compiled["flop_fraction"] < 1.0 and rows["exact+compile"]["flop_fraction"] == 1.0
    with pytest.raises(ValueError, match="suffix"):
        bench.main(["--quick", "--models", "mlp", "--variants", "exact+fast", "--out", str(out)])


def test_speedups_pair_the_rounds(bench: ModuleType) -> None:
    # the load triples from round 4 on; a burst also hits the variant's block in round 3
    exact = bench.Variant("exact", torch.nn.Identity(), {}, step_s=[1.0, 1.0, 1.0, 3.0, 3.0])
    fast = bench.Variant("approx@0.4", torch.nn.Identity(), {}, step_s=[0.7, 0.7, 2.1, 2.1, 2.1])
    # round by round: 1/0.7 four times, 1/2.1 once -> the median is 1/0.7
    assert fast.speedup_over(exact) == pytest.approx(1 / 0.7)
    # two separate medians (1.0 against 2.1) would call it 2x slower
    assert exact.median_ms / fast.median_ms == pytest.approx(1 / 2.1)
    with pytest.raises(ValueError):
        bench.Variant("x", torch.nn.Identity(), {}, step_s=[1.0]).speedup_over(exact)


def test_pinned_variants(bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """pinned@R: the budget-R plan's nodes at keep R exactly (top-k, no rounding); paper-pinned@R alike."""
    out = tmp_path / "bench.json"
    argv = [
        "--quick",
        "--models",
        "cnn",
        "--budgets",
        "0.4",
        "--pinned",
        "0.4",
        "--rounds",
        "1",
        "--steps",
        "1",
    ]
    argv += ["--warmup", "0", "--memory-steps", "0", "--threads", "1", "--markdown", "--out", str(out)]
    result = bench.main(argv)
    names = ["exact", "paper@0.4", "approx@0.4", "pinned@0.4", "paper-pinned@0.4"]
    _check_result(result, argv, out, capsys.readouterr().out, ["cnn"], names)
    rows = {r["variant"]: r for r in result["rows"]}
    planned = rows["approx@0.4"]["info"]["sampled"]
    pinned = rows["pinned@0.4"]["info"]["sampled"]
    assert set(pinned) == set(planned) == {"convs.1", "convs.2", "convs.3"}
    # 32 channels at 0.4: 13 kept (the budget allocation would round to multiples of 8)
    assert all(p == {"keep": 0.4, "k": 13, "inner": 32} for p in pinned.values())
    assert rows["paper-pinned@0.4"]["info"]["sampled"] == dict.fromkeys(pinned, 0.4)
    assert rows["pinned@0.4"]["flop_fraction"] == pytest.approx(rows["paper-pinned@0.4"]["flop_fraction"])
    # pinned@R is compared with paper-pinned@R, approx@B with paper@B
    ref = rows["paper-pinned@0.4"]["median_step_ms"]
    assert rows["pinned@0.4"]["speedup_vs_paper"] == pytest.approx(ref / rows["pinned@0.4"]["median_step_ms"])
    assert rows["paper-pinned@0.4"]["speedup_vs_paper"] == 1.0
    ref = rows["paper@0.4"]["median_step_ms"]
    assert rows["approx@0.4"]["speedup_vs_paper"] == pytest.approx(ref / rows["approx@0.4"]["median_step_ms"])


def test_channels_last_variants(bench: ModuleType, tmp_path: Path) -> None:
    """+cl trains a channels-last model; pinned@R+cl is compared with paper-pinned@R+cl and exact+cl."""
    out = tmp_path / "bench.json"
    names = ["exact", "exact+cl", "pinned@0.4+cl", "paper-pinned@0.4+cl"]
    argv = ["--quick", "--models", "cnn", "--budgets", "0.4", "--variants", ",".join(names), "--rounds", "1"]
    argv += ["--steps", "1", "--warmup", "0", "--memory-steps", "0", "--threads", "1", "--out", str(out)]
    rows = {r["variant"]: r for r in bench.main(argv)["rows"]}
    pinned, paper, exact = rows["pinned@0.4+cl"], rows["paper-pinned@0.4+cl"], rows["exact+cl"]
    assert pinned["speedup_vs_paper"] == pytest.approx(paper["median_step_ms"] / pinned["median_step_ms"])
    assert pinned["speedup_vs_base"] == pytest.approx(exact["median_step_ms"] / pinned["median_step_ms"])
    assert pinned["flop_fraction"] < 1.0 and exact["flop_fraction"] == 1.0
    w = bench.build("cnn", "quick")
    model = bench.ChannelsLast(w.model)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)
    torch.testing.assert_close(model(w.x), w.model(w.x))


def test_conv_layout_tool_prints_both_layouts(capsys: pytest.CaptureFixture[str]) -> None:
    _tool("bench_conv_layout").main(
        ["--size", "8", "--batch", "2", "--out", "16", "--ks", "4,8", "--repeats", "1"]
    )
    printed = capsys.readouterr().out
    assert "| kept k | NCHW | channels-last |" in printed
    assert all(f"| {k} | " in printed for k in (4, 8)) and "max_pool2d 2x2 forward, NCHW" in printed


def test_pinned_model_pins_nodes_the_allocation_left_exact(bench: ModuleType) -> None:
    """A node the budget did not need is still pinned; first / last (exclusions) stay exact."""
    w = bench.build("cnn", "quick")
    planned = approxcompile.optimize(copy.deepcopy(w.model), 0.8, example_inputs=(w.x,))
    reasons = {n.name: n.reason for n in planned.meta["approxcompile"].nodes}
    assert reasons["convs.2"] == "budget is met without sampling this node"  # the case under test
    pinned = bench.pinned_model(w, 0.4, planned)
    nodes = {n.name: n for n in pinned.meta["approxcompile"].nodes}
    assert {name for name, n in nodes.items() if n.sampled} == {"convs.1", "convs.2", "convs.3"}
    assert all(nodes[f"convs.{i}"].keep == 0.4 and nodes[f"convs.{i}"].method == "topk" for i in (1, 2, 3))
    assert not nodes["convs.0"].sampled and not nodes["head"].sampled


def test_byte_gpt_step_tool_compares_the_gather_and_the_optimizer(capsys: pytest.CaptureFixture[str]) -> None:
    import approxcompile.ops.sampled as sampled
    from approxcompile.ops import kernels

    gather, live = sampled.select, kernels.live_columns
    assert _tool("bench_byte_gpt").main(["--quick"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line[:40].strip() for line in lines]
    assert names == [
        "exact, AdamW default", "exact, AdamW fused", "0.6, index_select, AdamW default",
        "0.6, 2-D gather, AdamW default", "0.6, 2-D gather, AdamW fused",
        "0.6, 2-D gather, fused, dense backward",
    ]  # fmt: skip
    assert lines[0].endswith("1.00x over exact, default AdamW")
    assert sampled.select is gather and kernels.live_columns is live  # the switches are put back
