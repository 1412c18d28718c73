"""The multi-node recipe of docs/distributed.md, run as two torchrun "nodes" on loopback.

Two separate torchrun processes (``--nnodes 2 --node-rank 0/1``, one rank each) meet through
a c10d rendezvous on 127.0.0.1, as two hosts would through the first host's address.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ddp_workers import free_port

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(node: int, port: int, out: Path, *extra: str, rdzv_conf: str = "") -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        f"--node-rank={node}",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=approxcompile-test",
        "--max-restarts=0",
        *([f"--rdzv-conf={rdzv_conf}"] if rdzv_conf else []),
        str(ROOT / "tests" / "torchrun_worker.py"),
        f"--out={out}",
        *extra,
    ]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _two_nodes(tmp_path: Path, *extra: str) -> list[dict]:
    port = free_port()
    nodes = [_torchrun(node, port, tmp_path, *extra) for node in (0, 1)]
    logs = [p.communicate(timeout=180)[0] for p in nodes]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(p.returncode == 0 for p in nodes), logs
    return results


@pytest.mark.slow
def test_two_torchrun_nodes_train_with_the_sampled_allreduce(tmp_path: Path) -> None:
    results = _two_nodes(tmp_path)
    assert sorted(r["group_rank"] for r in results) == ["0", "1"]  # one rank per "node"
    for r in results:
        assert "error" not in r, r.get("trace")
        assert r["world"] == 2 and r["params_identical"]
        assert r["compressed"] == ["layers.1.weight", "layers.2.weight"] and r["fraction"] < 0.5


@pytest.mark.slow
def test_a_node_with_another_plan_fails_fast_on_every_rank(tmp_path: Path) -> None:
    for r in _two_nodes(tmp_path, "--budget-on-rank1=0.6"):
        assert "ranks [1] run a different plan than rank 0" in r.get("error", ""), r


@pytest.mark.slow
def test_a_missing_node_fails_the_rendezvous_after_its_join_timeout(tmp_path: Path) -> None:
    start = time.monotonic()
    lone = _torchrun(0, free_port(), tmp_path, rdzv_conf="join_timeout=8")
    log = lone.communicate(timeout=120)[0]
    assert lone.returncode != 0
    assert "RendezvousTimeoutError" in log, log[-3000:]
    assert time.monotonic() - start < 90  # the join timeout, not a hang
    assert not list(tmp_path.glob("rank*.json"))  # no rank ever started
