"""set_budget, the named schedules and the adaptive budget: re-planning without re-tracing."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import approxcompile
import approxcompile.passes as passes
from approxcompile import ops, schedule
from approxcompile.distributed import DistributedError, plan_fingerprint
from approxcompile.errors import BudgetError, PlanError
from tests.models import CNN, MLP


def _mlp(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    return MLP((64, 256, 256, 256, 256, 10)), torch.randn(32, 64)


@pytest.fixture(scope="module")
def planned() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    model, x = _mlp()
    return model, approxcompile.optimize(model, 0.4, example_inputs=(x,)), x


@pytest.fixture
def fast(planned):
    model, fast, x = planned
    return copy.deepcopy(fast)


def _keeps(fast) -> dict[str, float]:
    return {n.name: n.keep for n in fast.meta["approxcompile"].nodes}


def _kwarg_keeps(fast) -> dict[str, float]:
    sampled = (n for n in fast.graph.nodes if n.target in ops.SAMPLED_OPS)
    return {n.meta["approxcompile"].name: n.kwargs["keep"] for n in sampled}


def test_set_budget_reallocates_within_the_new_budget(fast) -> None:
    before = _keeps(fast)
    for budget in (0.3, 0.6, 0.4):
        plan = approxcompile.set_budget(fast, budget)
        assert plan.budget == budget and fast.meta["approxcompile"] is plan
        assert plan.fraction <= budget + 1e-9 and plan.fraction > budget - 0.1
        # the graph runs what the plan says: every sampled op's keep= is its node's keep
        assert _kwarg_keeps(fast) == {n: k for n, k in _keeps(fast).items() if n in _kwarg_keeps(fast)}
    assert _keeps(fast) == before  # same stored measurements, same budget: the same plan as optimize's
    low, high = approxcompile.set_budget(fast, 0.3), approxcompile.set_budget(fast, 0.6)
    assert sum(n.k for n in high.nodes) > sum(n.k for n in low.nodes)


def test_budget_one_is_the_exact_model_in_train_mode(planned, fast) -> None:
    model, _, x = planned
    fast.train()
    assert not torch.equal(fast(x), model(x))  # sampled at 0.4
    plan = approxcompile.set_budget(fast, 1.0)
    assert not any(n.sampled for n in plan.nodes) and plan.fraction == 1.0
    assert set(_kwarg_keeps(fast).values()) == {1.0}
    assert torch.equal(fast(x), model(x))
    fast(x).square().sum().backward()  # fast is a deep copy: its own parameters, equal values
    model.zero_grad()
    model(x).square().sum().backward()
    pairs = zip(fast.parameters(), model.parameters(), strict=True)
    assert all(torch.equal(a.grad, b.grad) for a, b in pairs)
    model.zero_grad()


def _forbid(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    def boom(*a, **k):
        raise AssertionError("re-traced or re-measured")

    for name in names:
        monkeypatch.setattr(passes, name, boom)
        for module in ("capture", "trace", "sensitivity", "shapes"):
            mod = getattr(passes, module, None)
            if mod is not None and hasattr(mod, name):
                monkeypatch.setattr(mod, name, boom)


def test_switching_neither_retraces_nor_remeasures_and_keeps_the_nodes(
    fast, monkeypatch: pytest.MonkeyPatch
) -> None:
    _forbid(monkeypatch, "capture", "trace", "propagate_shapes", "measure_sensitivity")
    monkeypatch.setattr(schedule, "node_curve", lambda *a, **k: pytest.fail("measured again"))
    sampled_before = [n for n in fast.graph.nodes if n.target in ops.SAMPLED_OPS]
    approxcompile.set_budget(fast, 0.6)
    nodes = list(fast.graph.nodes)
    assert all(n in nodes for n in sampled_before)  # the nodes optimize sampled are the same objects
    sched = schedule.Scheduler(fast, "cosine", total_steps=30, budget=0.2)
    for _ in range(30):
        sched.step()
        assert all(a is b for a, b in zip(fast.graph.nodes, nodes, strict=True))  # the very same nodes
    assert sched.current == 1.0 and sched.replans > 3


def test_a_schedule_ends_exact(planned, fast) -> None:
    model, _, x = planned
    fast.train()
    sched = schedule.Scheduler(fast, "anneal_to_exact", total_steps=20, budget=0.2, fraction=0.5)
    budgets = [sched.step() for _ in range(20)]
    assert budgets[:10] == [0.2] * 10 and budgets[-1] == 1.0
    assert budgets == sorted(budgets) and sched.replans == len(set(budgets))
    assert all(n.keep == 1.0 for n in fast.meta["approxcompile"].nodes)
    assert torch.equal(fast(x), model(x))


def test_schedule_shapes() -> None:
    at = schedule.budget_at
    assert [at("warmup_exact", s, 10, budget=0.3, fraction=0.3) for s in range(10)] == [1.0] * 3 + [0.3] * 7
    assert {at("constant", s, 10, budget=0.4) for s in range(10)} == {0.4}
    cool = [at("exact_cooldown", s, 10, budget=0.2, fraction=0.25) for s in range(10)]
    assert cool == [0.2] * 7 + [1.0] * 3
    cos = [at("cosine", s, 50, budget=0.2) for s in range(50)]
    assert cos[0] == 0.2 and cos[-1] == 1.0 and cos == sorted(cos) and len(set(cos)) <= 18
    assert all(math.isclose(b * 20, round(b * 20)) for b in cos[1:])  # rounded up to 1/20 steps


def test_bad_inputs_are_refused(fast) -> None:
    for bad in (0.0, 1.5, -0.2, float("nan"), "0.4"):
        with pytest.raises(BudgetError, match=r"budget must be"):
            approxcompile.set_budget(fast, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown schedule 'linear'; choose from constant"):
        schedule.Scheduler(fast, "linear", total_steps=10, budget=0.4)
    with pytest.raises(BudgetError, match=r"budget must be"):
        schedule.Scheduler(fast, "constant", total_steps=10, budget=2.0)
    with pytest.raises(ValueError, match="fraction must be in"):
        schedule.budget_at("anneal_to_exact", 0, 10, budget=0.4, fraction=0.0)
    with pytest.raises(ValueError, match="target must be a positive"):
        schedule.Adaptive(fast, budget=0.4, target=0.0)
    with pytest.raises(PlanError, match=r"\[set_budget\] needs a module approxcompile.optimize"):
        approxcompile.set_budget(torch.nn.Linear(3, 3), 0.5)


def test_an_infeasible_budget_leaves_the_module_as_it_was(fast) -> None:
    before, code = _keeps(fast), fast.code
    with pytest.raises(BudgetError, match=r"\[set_budget\].*smallest feasible budget") as info:
        approxcompile.set_budget(fast, 0.01)
    assert info.value.smallest_feasible is not None and info.value.smallest_feasible > 0.01
    assert _keeps(fast) == before and fast.code == code


def test_the_plan_is_the_same_on_every_rank(planned) -> None:
    _, fast, x = planned
    a, b = copy.deepcopy(fast), copy.deepcopy(fast)  # two ranks' modules from the same optimize()
    for budget in (0.25, 0.7, 0.45):
        pa, pb = approxcompile.set_budget(a, budget), approxcompile.set_budget(b, budget)
        assert pa == pb and plan_fingerprint(a) == plan_fingerprint(b)
    pa = approxcompile.set_budget(a, 0.3)
    assert plan_fingerprint(a) != plan_fingerprint(b)  # the fingerprint does see the keep ratios


def test_adaptive_spends_the_least_budget_that_holds_the_target(fast, planned) -> None:
    _, _, x = planned
    with pytest.raises(BudgetError) as info:
        approxcompile.set_budget(copy.deepcopy(fast), 0.01)
    smallest = math.ceil(info.value.smallest_feasible * 20) / 20  # the smallest feasible 1/20 level
    loose = schedule.Adaptive(copy.deepcopy(fast), budget=0.6, target=10.0, every=3)
    assert loose.step(x) == max(0.1, smallest) < 0.6
    tight = schedule.Adaptive(fast, budget=0.6, target=1e-9, every=3)
    assert tight.step(x) == 0.6  # nothing meets the target: the whole budget
    assert [tight.step(x) for _ in range(5)] == [0.6] * 5 and [h[0] for h in tight.history] == [0, 3]


def test_adaptive_measures_on_the_live_weights(fast, planned) -> None:
    _, _, x = planned
    schedule.remeasure(fast, (x,))
    curve = {n.name: n.sensitivity for n in fast.meta["approxcompile"].nodes if n.sensitivity}
    with torch.no_grad():
        fast.layers[2].weight.copy_(torch.randn_like(fast.layers[2].weight).abs() * torch.rand(256) ** 4)
    assert schedule.remeasure(fast, (x,)) == len(curve) == 3
    after = {n.name: n.sensitivity for n in fast.meta["approxcompile"].nodes if n.sensitivity}
    assert after["layers.2"] != curve["layers.2"] and after["layers.1"] == curve["layers.1"]
    assert [k for k, _ in after["layers.2"]] == [k for k, _ in curve["layers.2"]]  # same grid


def test_conv_nodes_switch_too() -> None:
    torch.manual_seed(0)
    model, x = CNN(), torch.randn(4, 1, 12, 12)
    fast = approxcompile.optimize(model, 0.5, example_inputs=(x,))
    schedule.Adaptive(fast, budget=0.7, target=0.05).step(x)
    assert any(n.target is ops.sampled_conv for n in fast.graph.nodes)
    approxcompile.set_budget(fast, 1.0)
    fast.train(), model.train()
    assert torch.equal(fast(x), model(x))


def _rank(rank: int, store_path: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    model, x = _mlp()
    fast = approxcompile.optimize(model, 0.5, example_inputs=(x,))
    batch = torch.randn(32, 64, generator=torch.Generator().manual_seed(100 + rank))  # each rank its own data
    local = copy.deepcopy(fast)
    dist.destroy_process_group()  # the local copy measures alone
    schedule.Adaptive(local, budget=0.5, target=0.12).step(batch)
    dist.init_process_group("gloo", store=dist.FileStore(store_path + "2", 2), rank=rank, world_size=2)
    budget = schedule.Adaptive(fast, budget=0.5, target=0.12).step(batch)
    agreed = plan_fingerprint(fast)
    approxcompile.set_budget(fast, 0.45)  # the same budget on both ranks: agreed
    try:
        approxcompile.set_budget(fast, 0.45 if rank == 0 else 0.6)
        refused = "no"
    except DistributedError:
        refused = "yes"
    Path(out, f"{rank}.txt").write_text(f"{agreed} {budget} {plan_fingerprint(local)} {refused}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_adaptive_agrees_across_ranks(tmp_path: Path) -> None:
    mp.start_processes(_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
    (f0, b0, local0, no0), (f1, b1, local1, no1) = (
        (tmp_path / f"{r}.txt").read_text().split() for r in (0, 1)
    )
    assert no0 == no1 == "yes"  # different budgets on the two ranks: refused on both
    assert f0 == f1 and b0 == b1  # adaptive: the same plan though each rank measured its own batch
    assert local0 != local1  # measured alone, the two batches would have given different plans
