"""tools/bench_ddp.py --link: ranks in a private network namespace with a rate-limited loopback.

The smoke run skips, with the tool's reason, where namespaces or tc are not permitted. No
timing thresholds: step times belong in docs/distributed.md.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _tool(name: str) -> ModuleType:
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    return importlib.import_module(name)


def test_link_speeds_parse_and_bad_ones_are_named() -> None:
    netns = _tool("netns")
    assert netns.parse_rate("1gbit") == 1e9 and netns.parse_rate("2.5Gbit") == 2.5e9
    assert netns.parse_rate("100mbit") == 1e8 and netns.parse_rate("unlimited") is None
    for bad in ("1gb", "fast", "-1gbit", "0mbit"):
        with pytest.raises(ValueError, match=f"link speed '{bad}'"):
            netns.parse_rate(bad)


def test_shaping_is_refused_outside_a_private_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a device besides lo in sight nothing is changed: the check runs before any ``ip link set``."""
    netns = _tool("netns")
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kw: object) -> object:
        calls.append(cmd)
        out = "1: lo: <LOOPBACK> mtu 65536\n2: eth0: <BROADCAST,UP> mtu 1500\n"
        return type("Done", (), {"stdout": out, "returncode": 0})()

    monkeypatch.setattr(netns.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match=r"devices \['lo', 'eth0'\] are visible"):
        netns.bring_up_loopback()
    assert calls == [["ip", "-o", "link", "show"]]


def test_the_tool_skips_with_the_reason_where_namespaces_are_not_permitted(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    netns, bench = _tool("netns"), _tool("bench_ddp")
    monkeypatch.delenv(netns.ENV_MARK, raising=False)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None if tool == "tc" else "/usr/bin/" + tool)
    assert bench.main(["--link", "1gbit"]) == 77
    assert "skipped: tc not found (tc and ip: apt-get install iproute2)" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_run_shapes_the_private_loopback(tmp_path: Path) -> None:
    import subprocess

    netns = _tool("netns")
    cmd, why = netns.probe()
    if cmd is None:
        pytest.skip(f"no private network namespace here: {why}")
    out = tmp_path / "ddp.json"
    args = "--world 2 --link unlimited,200mbit --steps 1 --rounds 1 --warmup 0 --sizes 784,256,256,256,10"
    done = subprocess.run(
        [sys.executable, str(TOOLS / "bench_ddp.py"), *args.split(), "--budget", "0.8", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = json.loads(out.read_text())["results"]
    assert result["links"] == ["unlimited", "200mbit"]
    assert set(result["step_ms"]) == {"unlimited", "200mbit"}
    assert "tbf" in result["qdisc"]["200mbit"] and "rate 200Mbit" in result["qdisc"]["200mbit"]
    assert "tbf" not in result["qdisc"]["unlimited"]  # shaping removed again
    assert result["bytes_per_step"]["approx+hook"] < result["bytes_per_step"]["exact"]
    assert "| 2 | 200mbit |" in done.stdout
    # the host's own loopback was never shaped
    host = subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True).stdout
    assert "200Mbit" not in host


def test_scale_model_formula_and_measured_ratios(tmp_path: Path) -> None:
    scale = _tool("scale_model")
    # one ring of 2 ranks, no latency: compute + 2 * 1/2 * 8 B / R
    assert scale.step_time(world=2, rate=8e9, grad_bytes=1e9, compute_s=0.5, buckets=4, alpha_s=0.0) == 1.5
    assert scale.step_time(
        world=4, rate=1e9, grad_bytes=0, compute_s=0.0, buckets=2, alpha_s=1e-3
    ) == pytest.approx(0.012)
    measured = {
        "results": [{"world": 2, "bytes_per_step": {"exact": 400, "approx+hook": 166}}],
        "fits": {"2": {"exact": [0.2, 1e9], "approx": [0.15, 1e9], "approx+hook": [0.15, 4e8]}},
    }
    (tmp_path / "m.json").write_text(json.dumps(measured))
    assert scale.measured_ratios(tmp_path / "m.json") == pytest.approx((0.415, 0.75))
