"""``approxcompile inspect`` / ``export``: optimize a model from the command line.

    approxcompile inspect mypkg.models:mlp --input-shape 64,784 --budget 0.4
    approxcompile inspect path/to/models.py:cnn --input-shape 32,3,32,32 --json --dot cnn.dot
    approxcompile export mypkg.models:mlp --input-shape 64,784 --budget 0.4 --out artifacts

Every expected failure (bad arguments, a module that does not import, an approxcompile error)
is one ``approxcompile: error: ...`` line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import torch
from torch import nn

from approxcompile.choices import Method, Mode, Scores
from approxcompile.config import METHODS, MODES, SCORES, ApproxConfig
from approxcompile.errors import ApproxCompileError

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "long": torch.long}
_EXIT_ERROR = 2


class CliError(Exception):
    """A user mistake the CLI reports in one line (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    # argparse prints usage and calls sys.exit on a bad argument; main() must return the status
    # and print one line instead, so errors are raised and handled there.
    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see '{self.prog} --help')")


def parse_shape(text: str) -> tuple[int, ...]:
    """``"64,784" -> (64, 784)``; argparse turns the ``ArgumentTypeError`` into a usage error."""
    try:
        shape = tuple(int(p) for p in text.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad shape {text!r}: expected comma-separated integers, e.g. 64,784"
        ) from None
    if any(d < 0 for d in shape):
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: dimensions must be >= 0")
    return shape


def parse_budget(text: str) -> float:
    """A fraction in (0, 1], checked here so a typo fails before the model is imported."""
    try:
        budget = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad budget {text!r}: expected a number in (0, 1]") from None
    if not 0 < budget <= 1:
        raise argparse.ArgumentTypeError(f"budget must be in (0, 1], got {text}")
    return budget


def build_parser() -> argparse.ArgumentParser:
    """The ``approxcompile`` argument parser (exposed for documentation tools)."""
    parser = _Parser(prog="approxcompile", description="Inspect what approxcompile does to a model.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    p = sub.add_parser(
        "inspect",
        help="optimize a model and print the plan",
        description="Import a model, run approxcompile.optimize on random example inputs and print "
        "which matmul / linear / conv nodes are sampled, how much, and why the rest stay exact.",
    )
    _model_arguments(p)
    p.add_argument(
        "--mode",
        choices=MODES,
        default="forward",
        help="forward: sample the forward product; backward: exact forward, sampled gradients "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--scores",
        choices=SCORES,
        default="activations",
        help="weights: score slices from the weights alone, for data-parallel ranks (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--dot", metavar="FILE", help="also write the rewritten graph as Graphviz DOT to FILE")
    e = sub.add_parser(
        "export",
        help="optimize a model and export ONNX Runtime training artifacts",
        description="Import a model, run approxcompile.optimize, and write ONNX Runtime training "
        "artifacts (training, exact eval and optimizer graphs, checkpoint) to --out; with "
        "--onnx-only, just the sampled training graph and the exact eval graph as ONNX files. "
        "Needs the optional extra: pip install 'approxcompile[ort]'.",
    )
    _model_arguments(e)
    e.add_argument("--out", required=True, metavar="DIR", help="directory to write the files to")
    e.add_argument("--onnx-only", action="store_true", help="write model_train.onnx and model_eval.onnx only")
    e.add_argument(
        "--loss",
        choices=("cross_entropy", "mse"),
        default="cross_entropy",
        help="loss appended to the training graph (default: %(default)s)",
    )
    e.add_argument(
        "--optimizer",
        choices=("adamw", "sgd"),
        default="adamw",
        help="optimizer graph to generate (default: %(default)s)",
    )
    return parser


def _model_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments every subcommand shares: which model, its inputs, budget, method, seed."""
    p.add_argument(
        "target",
        metavar="MODULE:FACTORY",
        help="dotted module path or path/to/file.py, then the name of a function returning an "
        "nn.Module (called with no arguments) or of an nn.Module instance, e.g. mypkg.models:mlp",
    )
    p.add_argument(
        "--input-shape",
        action="append",
        type=parse_shape,
        required=True,
        metavar="SHAPE",
        help="shape of one example input, e.g. 64,784; repeat for models with several inputs",
    )
    p.add_argument(
        "--input-dtype",
        action="append",
        choices=sorted(_DTYPES),
        metavar="DTYPE",
        help="float32 (default; torch.randn) or long (integers in [0, 10), e.g. token ids) or "
        "float64; give once for all inputs or once per --input-shape",
    )
    p.add_argument(
        "--budget",
        type=parse_budget,
        default=0.4,
        help="fraction of the dense training FLOPs to spend, in (0, 1] (default: %(default)s)",
    )
    p.add_argument(
        "--method", choices=METHODS, help="sampling method (default: topk; bernoulli with --mode backward)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed for example inputs and sampling (default: %(default)s)"
    )


def _import(module_text: str) -> ModuleType:
    if module_text.endswith(".py") or os.sep in module_text or "/" in module_text:
        path = Path(module_text)
        if not path.is_file():
            raise CliError(f"no such file: {module_text}")
        name = f"_approxcompile_cli_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise CliError(f"cannot import {module_text}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise CliError(f"importing {module_text} failed: {type(e).__name__}: {e}") from e
        return module
    # Like `python -m`, find modules in the working directory; undone afterwards so that
    # main() called from Python leaves sys.path as it was.
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_text)
    except Exception as e:
        raise CliError(f"cannot import {module_text!r}: {type(e).__name__}: {e}") from e
    finally:
        if added:
            sys.path.remove(cwd)


def load_model(target: str) -> nn.Module:
    """``"pkg.mod:factory"`` or ``"file.py:factory"`` -> the nn.Module it names or returns."""
    module_text, sep, attr = target.rpartition(":")
    if not sep or not module_text or not attr:
        raise CliError(f"expected MODULE:FACTORY, e.g. mypkg.models:mlp, got {target!r}")
    obj: Any = _import(module_text)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CliError(f"{module_text!r} has no attribute {attr!r}") from None
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise CliError(f"{target} is a {type(obj).__name__}, not an nn.Module or a factory returning one")
    try:
        model = obj()
    except Exception as e:
        raise CliError(f"calling {attr}() failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise CliError(f"{attr}() returned a {type(model).__name__}, not an nn.Module")
    return model


def example_inputs(
    shapes: Sequence[tuple[int, ...]], dtypes: Sequence[str] | None, generator: torch.Generator
) -> tuple[torch.Tensor, ...]:
    """Random inputs: ``randn`` for floating dtypes, ``randint(0, 10)`` for ``long``."""
    names = list(dtypes or ["float32"])
    if len(names) == 1:
        names *= len(shapes)
    if len(names) != len(shapes):
        raise CliError(
            f"got {len(names)} --input-dtype for {len(shapes)} --input-shape; give one or one each"
        )
    out = []
    for shape, name in zip(shapes, names, strict=True):
        dtype = _DTYPES[name]
        if dtype.is_floating_point:
            out.append(torch.randn(shape, dtype=dtype, generator=generator))
        else:
            out.append(torch.randint(0, 10, shape, dtype=dtype, generator=generator))
    return tuple(out)


def _optimized(args: argparse.Namespace) -> tuple[Any, tuple[torch.Tensor, ...]]:
    from approxcompile.api import optimize  # deferred: `--help` should not pay for the passes

    model = load_model(args.target)
    inputs = example_inputs(args.input_shape, args.input_dtype, torch.Generator().manual_seed(args.seed))
    # Seed sampling too, without leaving the global generator changed for a caller of main().
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        # --mode / --scores exist for `inspect` only (export keeps forward sampling).
        mode: Mode = getattr(args, "mode", "forward")
        scores: Scores = getattr(args, "scores", "activations")
        method: Method = args.method or ("bernoulli" if mode == "backward" else "topk")
        config = ApproxConfig(method=method, mode=mode, scores=scores)
        gm = optimize(model, args.budget, example_inputs=inputs, config=config)
    return gm, inputs


def _inspect(args: argparse.Namespace) -> int:
    from approxcompile.dot import write_dot
    from approxcompile.report import report

    gm, _ = _optimized(args)
    rep = report(gm)
    print(rep.to_json() if args.json else rep)
    if args.dot:
        write_dot(gm, args.dot)
        print(f"approxcompile: wrote {args.dot}", file=sys.stderr)
    return 0


def _export(args: argparse.Namespace) -> int:
    from approxcompile.export import export_onnx, export_training, require_ort
    from approxcompile.export.artifacts import MANIFEST
    from approxcompile.export.lower import transposed_weights
    from approxcompile.report import report

    if not args.onnx_only:
        require_ort()  # fail before optimizing when the extra is missing
    gm, inputs = _optimized(args)
    out = Path(args.out)
    if args.onnx_only:
        written = [
            export_onnx(gm, inputs, out / "model_train.onnx"),
            export_onnx(gm, inputs, out / "model_eval.onnx", training=False),
        ]
    else:
        art = export_training(gm, inputs, out, loss=args.loss, optimizer=args.optimizer)
        written = [art.training_model, art.eval_model, art.optimizer_model, art.checkpoint]
        written.append(art.directory / MANIFEST)
    plan = report(gm)
    print(f"{len(plan.sampled)} of {len(plan.nodes)} product nodes sampled at budget {args.budget}")
    transposed = transposed_weights(gm)
    if transposed:
        where = "the training graph" if args.onnx_only else "both graphs and the checkpoint"
        print(f"stored transposed (W.T) in {where}: {', '.join(transposed)}")
    for path in written:
        print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``approxcompile`` command; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        return _export(args) if args.command == "export" else _inspect(args)
    except SystemExit as e:  # --help and --version exit through argparse
        return e.code if isinstance(e.code, int) else 0
    except (CliError, ApproxCompileError, ValueError, OSError) as e:
        # One line even when the message names a node over several lines.
        text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"approxcompile: error: {text or type(e).__name__}", file=sys.stderr)
        return _EXIT_ERROR
