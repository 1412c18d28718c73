"""Plans you can keep: configs and plans to JSON and back, re-applied in a new process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import approxcompile
from approxcompile import ApproxConfig, NodeOverride, PlanError
from approxcompile.cli import main
from tests.models import CNN, MLP, mlp

ROOT = Path(__file__).resolve().parents[1]


def _config() -> ApproxConfig:
    return (
        ApproxConfig(method="crs", keep_grid=(0.5, 0.25), seed=7, leaf_modules=(CNN,))
        .set_op_type(nn.Conv2d, NodeOverride(min_k=16))
        .set_module_name_regex(r"layers\.[12]", NodeOverride(method="uniform"))
        .set_module_name("layers.3", NodeOverride(exact=True, keep=0.5))
    )


def test_config_round_trips_through_json() -> None:
    config = _config()
    data = json.loads(json.dumps(config.to_dict()))
    assert data["version"] == 1
    assert data["leaf_modules"] == ["tests.models:CNN"]
    assert data["op_type_overrides"] == [["conv", {"min_k": 16}]]
    assert data["module_name_overrides"] == [["layers.3", {"exact": True, "keep": 0.5}]]
    again = ApproxConfig.from_dict(data)
    assert again == config and again.leaf_modules == (CNN,)
    assert ApproxConfig.from_dict({}) == ApproxConfig()  # missing keys take the defaults


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"version": 99}, "config version 99"),
        ({"methd": "crs"}, r"unknown ApproxConfig keys \['methd'\]"),
        ({"leaf_modules": ["no.such.module:X"]}, "cannot be imported"),
        ({"module_name_overrides": [["fc", {"keep": 2.0}]]}, r"keep must be a number in \(0, 1\]"),
        ({"module_name_overrides": [["fc", {"kep": 0.5}]]}, "module_name_overrides entry 'fc'"),
    ],
)
def test_bad_config_dicts_say_what_is_wrong(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ApproxConfig.from_dict(data)


def test_local_leaf_module_is_refused_with_the_reason() -> None:
    class Local(nn.Module):
        pass

    with pytest.raises(ValueError, match="no other process can import it"):
        ApproxConfig(leaf_modules=(Local,)).to_dict()


def test_repr_shows_overrides_and_changed_fields_only() -> None:
    text = repr(ApproxConfig(method="crs").set_module_name("fc2", NodeOverride(keep=0.5)))
    assert text == "ApproxConfig(method='crs', module_name_overrides=(('fc2', NodeOverride(keep=0.5)),))"
    assert repr(ApproxConfig()) == "ApproxConfig()"


# Run twice: once to optimize, save the plan and record train-mode outputs and gradients under a
# fixed seed; once, in a new process, to re-apply the plan with the sensitivity and timing passes
# replaced by ones that fail, on *trained* weights (where optimizing again would plan differently).
_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import approxcompile, approxcompile.passes as passes
    from tests.models import mlp
    out, plan_path, state_path, phase = sys.argv[1:5]
    model = mlp()
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    config = approxcompile.ApproxConfig(method="bernoulli")
    if phase == "save":
        fast = approxcompile.optimize(model, 0.5, example_inputs=(x,), config=config)
        approxcompile.save_plan(fast, plan_path)
        # "train": weights change, so a new plan would come out differently
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(torch.linspace(0.1, 3.0, p.numel()).reshape(p.shape))
        torch.save(model.state_dict(), state_path)
    else:
        model.load_state_dict(torch.load(state_path))
        def boom(*a, **k):
            raise AssertionError("re-applying a plan must not measure")
        passes.measure_sensitivity = passes.measure_timing = passes.apply_exclusions = boom
        fast = approxcompile.optimize(model, example_inputs=(x,), plan=plan_path)
    fast.train()
    torch.manual_seed(123)
    y = fast(x)
    y.square().sum().backward()
    keeps = {n.name: (n.keep, n.k, n.method, n.est_error) for n in approxcompile.report(fast).nodes}
    grads = {k: v.grad for k, v in fast.named_parameters()}
    torch.save({"y": y.detach(), "grads": grads, "keeps": keeps}, out)
    """
)


def _run(tmp_path: Path, phase: str) -> dict[str, object]:
    out = tmp_path / f"{phase}.pt"
    args = [str(out), str(tmp_path / "plan.json"), str(tmp_path / "state.pt"), phase]
    subprocess.run([sys.executable, "-c", _SCRIPT, *args], cwd=ROOT, check=True, timeout=300)
    return torch.load(out)


def test_saved_plan_reapplied_in_a_new_process_samples_identically(tmp_path: Path) -> None:
    saved = _run(tmp_path, "save")
    again = _run(tmp_path, "load")
    assert saved["keeps"] == again["keeps"]
    assert any(k < 1.0 for k, _, _, _ in saved["keeps"].values())  # something was sampled
    # Same trained weights, same plan, same seed: the same sample in both processes.
    assert torch.equal(saved["y"], again["y"])
    for name, grad in saved["grads"].items():
        assert torch.equal(grad, again["grads"][name]), name
    model = mlp()
    model.load_state_dict(torch.load(tmp_path / "state.pt"))
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    # a plan made afresh on the trained weights measures other errors: the replay kept the saved ones
    fresh = approxcompile.optimize(model, 0.5, example_inputs=(x,), config=ApproxConfig(method="bernoulli"))
    fresh_keeps = {n.name: (n.keep, n.k, n.method, n.est_error) for n in approxcompile.report(fresh).nodes}
    assert fresh_keeps != saved["keeps"]


def test_plan_does_not_fit_another_model(tmp_path: Path) -> None:
    x = torch.randn(16, 64)
    fast = approxcompile.optimize(mlp(), 0.5, example_inputs=(x,))
    path = approxcompile.save_plan(fast, tmp_path / "plan.json")
    with pytest.raises(PlanError, match=r"\[replay\] node 'layers.0': inner is 32 here but 64"):
        approxcompile.optimize(MLP((32, 128, 128, 128, 10)), example_inputs=(torch.randn(16, 32),), plan=path)
    with pytest.raises(PlanError, match="nodes only in the plan"):
        approxcompile.optimize(MLP((64, 128, 10)), example_inputs=(x,), plan=path)
    with pytest.raises(PlanError, match="budget=0.4 differs"):
        approxcompile.optimize(mlp(), 0.4, example_inputs=(x,), plan=path)
    with pytest.raises(PlanError, match="config differs"):
        approxcompile.optimize(mlp(), example_inputs=(x,), plan=path, config=ApproxConfig(seed=1))
    with pytest.raises(ValueError, match="not an approxcompile plan"):
        approxcompile.load_plan({"nodes": []})


def test_cli_config_file_and_plan_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = ApproxConfig(method="uniform").set_module_name("layers.2", NodeOverride(exact=True))
    (tmp_path / "cfg.json").write_text(json.dumps(config.to_dict()))
    base = ["inspect", "tests.models:mlp", "--input-shape", "16,64", "--json", "-q"]
    assert main([*base, "--budget", "0.8", "--config", str(tmp_path / "cfg.json"), "--save-plan",
                 str(tmp_path / "plan.json")]) == 0  # fmt: skip
    first = json.loads(capsys.readouterr().out)
    assert first["method"] == "uniform"
    by_name = {n["name"]: n for n in first["nodes"]}
    assert by_name["layers.2"]["reason"] == "left exact by override (module_name 'layers.2')"
    assert main([*base, "--plan", str(tmp_path / "plan.json")]) == 0
    second = json.loads(capsys.readouterr().out)
    assert [(n["name"], n["k"]) for n in second["nodes"]] == [(n["name"], n["k"]) for n in first["nodes"]]
    assert main([*base, "--plan", str(tmp_path / "plan.json"), "--budget", "0.3"]) == 2
    assert "--budget cannot change a saved --plan" in capsys.readouterr().err
