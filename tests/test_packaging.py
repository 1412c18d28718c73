"""Packaging: what the library imports is declared, torch is a tested range, --version works."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import torch
from packaging.requirements import Requirement
from packaging.version import Version

import approxcompile
from approxcompile.cli import main

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# import name -> distribution name, for the imports whose names differ
DIST = {"onnxruntime": "onnxruntime-training", "sklearn": "scikit-learn"}


def _imports(paths: list[Path]) -> dict[str, set[str]]:
    """Top-level module -> files importing it (at any depth: lazy imports count too)."""
    found: dict[str, set[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(path.relative_to(ROOT).as_posix())
    # importlib.import_module("x") with a literal name
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", None) == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                found.setdefault(node.args[0].value.split(".")[0], set()).add(path.name)
    return found


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    core = {Requirement(r).name.lower() for r in PYPROJECT["dependencies"]}
    extras = {
        k: {Requirement(r).name.lower() for r in v} for k, v in PYPROJECT["optional-dependencies"].items()
    }
    return core, extras


def test_every_third_party_import_of_the_library_is_declared() -> None:
    library = sorted((ROOT / "approxcompile").rglob("*.py")) + sorted((ROOT / "passes").rglob("*.py"))
    core, extras = _declared()
    optional = set().union(*(v for k, v in extras.items() if k != "dev"))
    missing = {}
    for module, files in _imports(library).items():
        if module in sys.stdlib_module_names or module == "approxcompile":
            continue
        dist = DIST.get(module, module).lower()
        if dist not in core and dist not in optional:
            missing[module] = sorted(files)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_extras_hold_what_their_features_import() -> None:
    core, extras = _declared()
    assert "tqdm" not in core and "tqdm" in extras["ort"] and "tqdm" in extras["demo"]
    assert "matplotlib" in extras["plot"] and "matplotlib" in extras["demo"]
    assert {"onnx", "onnxruntime-training"} <= extras["ort"]
    assert "numpy" in core  # the export modules and the data loaders import it


def test_torch_is_a_range_that_holds_the_tested_version() -> None:
    (spec,) = [Requirement(r) for r in PYPROJECT["dependencies"] if r.startswith("torch")]
    assert not any(s.operator == "==" for s in spec.specifier), "no exact pin in the library"
    assert Version(torch.__version__.split("+")[0]) in spec.specifier
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert Version(python) in Requirement(f"python{PYPROJECT['requires-python']}").specifier
    assert f"Programming Language :: Python :: {python}" in PYPROJECT["classifiers"]


def test_version_everywhere_is_the_same(capsys) -> None:
    assert importlib.metadata.version("approxcompile") == approxcompile.__version__
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"approxcompile {approxcompile.__version__}\n"
    done = subprocess.run(
        [sys.executable, "-m", "approxcompile", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout == f"approxcompile {approxcompile.__version__}\n"


def test_export_help_offers_only_its_own_options(capsys) -> None:
    assert main(["export", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--mode" not in text and "--scores" not in text
    assert "--plan" in text and "--config" in text
