"""The ``approxcompile inspect`` command: reports on success, one error line and status 2 on mistakes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from approxcompile.cli import main, parse_shape

MODEL_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def tiny():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                             nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))

    def embed():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(10, 32), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64),
                             nn.ReLU(), nn.Linear(64, 4))

    instance = tiny()
    number = 3

    def not_a_module():
        return 42

    def broken():
        raise RuntimeError("factory exploded")
    """
)


@pytest.fixture
def model_file(tmp_path: Path) -> str:
    path = tmp_path / "user_models.py"
    path.write_text(MODEL_FILE)
    return str(path)


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run main(), insist on status 2 and exactly one stderr line, and return that line."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("approxcompile: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "tests.models", "--input-shape", "8,64"], "expected MODULE:FACTORY"),
        (["inspect", "tests.models:", "--input-shape", "8,64"], "expected MODULE:FACTORY"),
        (["inspect", "no_such_module_xyz:f", "--input-shape", "8,64"], "cannot import 'no_such_module_xyz'"),
        (["inspect", "tests.models:nope", "--input-shape", "8,64"], "has no attribute 'nope'"),
        (["inspect", "tests.models:mlp", "--input-shape", "8,x"], "bad shape '8,x'"),
        (["inspect", "tests.models:mlp", "--input-shape", "8,-1"], "dimensions must be >= 1"),
        (["inspect", "tests.models:mlp"], "--input-shape"),
        (
            ["inspect", "tests.models:mlp", "--input-shape", "8,64", "--budget", "1.5"],
            "budget must be in (0, 1]",
        ),
        (["inspect", "tests.models:mlp", "--input-shape", "8,64", "--budget", "lots"], "bad budget 'lots'"),
        (["inspect", "tests.models:mlp", "--input-shape", "8,64", "--method", "magic"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
        (["inspect", "missing/file.py:f", "--input-shape", "8,64"], "no such file: missing/file.py"),
    ],
)
def test_bad_arguments(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert message in _error(capsys, argv)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("number", "is a int, not an nn.Module"),
        ("not_a_module", "not_a_module() returned a int, not an nn.Module"),
        ("broken", "calling broken() failed: RuntimeError: factory exploded"),
    ],
)
def test_bad_factories(
    capsys: pytest.CaptureFixture[str], model_file: str, factory: str, message: str
) -> None:
    assert message in _error(capsys, ["inspect", f"{model_file}:{factory}", "--input-shape", "8,16"])


def test_import_error_in_user_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import no_such_dependency_xyz\n")
    line = _error(capsys, ["inspect", f"{bad}:f", "--input-shape", "8,16"])
    assert "importing" in line and "ModuleNotFoundError" in line and f"{bad}" in line


def test_dtype_count_mismatch(capsys: pytest.CaptureFixture[str], model_file: str) -> None:
    argv = ["inspect", f"{model_file}:tiny", "--input-shape", "8,16"]
    line = _error(capsys, [*argv, "--input-dtype", "long", "--input-dtype", "float32"])
    assert "2 --input-dtype for 1 --input-shape" in line


def test_approxcompile_error_is_one_line(capsys: pytest.CaptureFixture[str], model_file: str) -> None:
    # The model wants 16 features; the multi-line ExampleInputError must come out as one line.
    line = _error(capsys, ["inspect", f"{model_file}:tiny", "--input-shape", "8,17"])
    assert "[shapes]" in line and "mat1 and mat2 shapes cannot be multiplied" in line


def test_parse_shape() -> None:
    assert parse_shape("64,784") == (64, 784)
    assert parse_shape(" 2, 3 ,4") == (2, 3, 4)


def test_help_returns_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--help"]) == 0
    out = capsys.readouterr().out
    assert "MODULE:FACTORY" in out and "--input-shape" in out and "topk" in out


def test_inspect_table_from_file_leaves_globals_alone(
    capsys: pytest.CaptureFixture[str], model_file: str
) -> None:
    path_before, rng_before = list(sys.path), torch.get_rng_state()
    assert main(["inspect", f"{model_file}:tiny", "--input-shape", "8,16", "--budget", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "approxcompile plan: method=topk, budget=0.5" in out
    assert "first candidate node" in out and "sampled nodes" in out
    assert sys.path == path_before and torch.equal(torch.get_rng_state(), rng_before)


def test_inspect_json_and_dot(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    dot = tmp_path / "mlp.dot"
    argv = [
        "inspect",
        "tests.models:mlp",
        "--input-shape",
        "8,64",
        "--json",
        "--dot",
        str(dot),
        "--method",
        "crs",
    ]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["method"] == "crs" and data["budget"] == 0.4
    assert [n["name"] for n in data["nodes"]] == ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert data["totals"]["sampled"] == sum(n["sampled"] for n in data["nodes"]) > 0
    assert data["totals"]["planned_flops"] <= 0.4 * data["totals"]["dense_flops"]
    text = dot.read_text()
    assert text.startswith('digraph "approxcompile" {') and "sampled_linear" in text and "keep=" in text
    assert f"wrote {dot}" in err


def test_inspect_module_instance_and_long_inputs(capsys: pytest.CaptureFixture[str], model_file: str) -> None:
    assert main(["inspect", f"{model_file}:instance", "--input-shape", "8,16", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["nodes"]) == 4
    argv = [
        "inspect",
        f"{model_file}:embed",
        "--input-shape",
        "4,6",
        "--input-dtype",
        "long",
        "--json",
        "--budget",
        "0.9",
    ]
    assert main(argv) == 0
    assert [n["name"] for n in json.loads(capsys.readouterr().out)["nodes"]] == ["1", "3", "5"]


def test_same_seed_same_report(capsys: pytest.CaptureFixture[str], model_file: str) -> None:
    argv = ["inspect", f"{model_file}:tiny", "--input-shape", "8,16", "--json", "--seed", "3"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first


def test_python_dash_m() -> None:
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "approxcompile", "inspect", "tests.models", "--input-shape", "8,64"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("approxcompile: error:") and "expected MODULE:FACTORY" in proc.stderr
