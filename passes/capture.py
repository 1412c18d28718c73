"""Capture: the frontend that turns a user's model into the ``fx.GraphModule`` the passes plan on.

::

    frontend="fx"      torch.fx.symbolic_trace (fast; the graph names modules as the user does)
    frontend="export"  torch.export, non-strict, one graph per mode (passes/exported.py)
    frontend="dynamo"  torch.compile with a backend that plans each region (passes/dynamo.py)
    frontend="auto"    fx where it is faithful, else export, else dynamo

Symbolic tracing is fast but silently wrong on two things: it drops ``torch.no_grad()`` blocks
inside ``forward`` and freezes reads of ``self.training`` at trace time. ``auto`` therefore takes
fx only for models whose own ``forward`` code does neither (the source of every module class
defined outside torch is read), and records which frontend it used and why in
``CaptureInfo``, which the report shows. ``torch.compile``d modules are unwrapped and a module
``optimize`` already returned is planned again from the model it came from.
"""

from __future__ import annotations

import inspect
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from approxcompile.errors import TraceError
from approxcompile.passes.base import PassResult
from approxcompile.passes.trace import _user_frame, trace

FRONTENDS = ("auto", "fx", "export", "dynamo")
CAPTURE_KEY = "approxcompile.capture"  # GraphModule.meta key of the CaptureInfo
SOURCE_KEY = "approxcompile.source"  # GraphModule.meta key of the model optimize() was given
_TORCH_DIR = os.path.dirname(torch.__file__)
# Code that symbolic tracing would get wrong: grad-mode changes and reads of the mode flag.
_UNFAITHFUL = re.compile(r"\bno_grad\b|\bset_grad_enabled\b|\benable_grad\b|\binference_mode\b|\.training\b")


@dataclass(frozen=True, kw_only=True)
class CaptureResult(PassResult):
    frontend: str  # "fx" | "export" | "dynamo"
    reason: str  # why that frontend, and how the modes were handled
    seconds: float
    model: nn.Module  # the module captured: behind torch.compile / an earlier optimize


@dataclass(frozen=True, kw_only=True)
class CaptureInfo:
    """Which frontend captured the graph, why, and how long it took."""

    frontend: str  # "fx" | "export" | "dynamo"
    reason: str
    seconds: float


def unwrap(model: nn.Module) -> nn.Module:
    """The module behind ``torch.compile(m)`` (``_orig_mod``) or behind an earlier ``optimize``."""
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, fx.GraphModule) and isinstance(model.meta.get(SOURCE_KEY), nn.Module):
            model = model.meta[SOURCE_KEY]
        else:
            return model


def fx_hazards(model: nn.Module) -> list[str]:
    """``file:line: code`` of every line in a traced ``forward`` that symbolic tracing gets wrong."""
    found: list[str] = []
    seen: set[type] = set()
    for module in model.modules():
        cls = type(module)
        if cls in seen or cls.forward is nn.Module.forward:
            continue
        seen.add(cls)
        try:
            filename = inspect.getsourcefile(cls.forward) or ""
            lines, start = inspect.getsourcelines(cls.forward)
        except (OSError, TypeError):
            continue
        if filename.startswith(_TORCH_DIR):  # torch's own modules are leaves of the fx tracer
            continue
        for i, line in enumerate(lines):
            if _UNFAITHFUL.search(line.split("#", 1)[0]):
                found.append(f"{filename}:{start + i}: {line.strip()}")
    return found


def _fail(model: nn.Module, errors: dict[str, BaseException]) -> TraceError:
    """One error naming the user's failing code and the fixes, from every frontend's failure."""
    where = ""
    for e in errors.values():
        where = where or _user_frame(e)[0]
    causes = "\n".join(
        f"  {name}: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}" for name, e in errors.items()
    )
    return TraceError(
        f"[capture] no frontend could capture {type(model).__name__}:\n{causes}\n"
        f"  failing code: {where or 'unknown (no frame outside torch)'}\n"
        "  fix: write data-dependent branches with torch.cond, or move the code into a submodule and "
        "list its type in ApproxConfig(leaf_modules=...) with frontend='fx'"
    )


def _fx(
    model: nn.Module, leaf_modules: tuple[type[nn.Module], ...], concrete_args: dict[str, Any] | None
) -> fx.GraphModule:
    return trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args).graph_module


def _export(model: nn.Module, example_inputs: Sequence[Any]) -> tuple[fx.GraphModule, str]:
    from approxcompile.passes.exported import capture_export

    return capture_export(model, example_inputs)


def capture(
    model: nn.Module,
    example_inputs: Sequence[Any],
    *,
    frontend: str = "auto",
    leaf_modules: tuple[type[nn.Module], ...] = (),
    concrete_args: dict[str, Any] | None = None,
) -> CaptureResult:
    """``model`` -> ``GraphModule`` sharing its tensors; ``meta[CAPTURE_KEY]`` says how it was made."""
    if frontend not in FRONTENDS:
        raise ValueError(f"frontend must be one of {FRONTENDS}, got {frontend!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize() needs an nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    start = time.perf_counter()
    errors: dict[str, BaseException] = {}
    gm: fx.GraphModule | None = None
    if frontend == "fx":
        gm, used, reason = _fx(model, leaf_modules, concrete_args), "fx", "requested"
    elif frontend == "auto":
        hazards = fx_hazards(model)
        if not hazards:
            try:
                gm, used = _fx(model, leaf_modules, concrete_args), "fx"
                reason = (
                    "symbolic tracing succeeded and forward neither changes grad mode nor reads self.training"
                )
            except TraceError as e:
                errors["fx"] = e.__cause__ or e
        else:
            errors["fx"] = RuntimeError(f"not faithful here: {hazards[0]}")
    if gm is None and frontend in ("auto", "export"):
        try:
            gm, modes = _export(model, example_inputs)
            used = "export"
            why = "requested" if frontend == "export" else f"fx {_short(errors['fx'])}"
            reason = f"{why}; {modes}"
        except Exception as e:
            if frontend == "export":
                raise _fail(model, {"export": e}) from e
            errors["export"] = e
    if gm is None and frontend in ("auto", "dynamo"):
        from approxcompile.passes.dynamo import capture_dynamo

        try:
            gm = capture_dynamo(model, example_inputs)
        except Exception as e:
            errors["dynamo"] = e
            raise _fail(model, errors) from e
        used = "dynamo"
        reason = (
            "requested" if frontend == "dynamo" else "; ".join(f"{k} {_short(v)}" for k, v in errors.items())
        )
    if gm is None:
        raise _fail(model, errors)
    seconds = time.perf_counter() - start
    gm.meta[CAPTURE_KEY] = CaptureInfo(frontend=used, reason=reason, seconds=seconds)
    gm.meta[SOURCE_KEY] = model
    return CaptureResult(
        graph_module=gm, modified=True, frontend=used, reason=reason, seconds=seconds, model=model
    )


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if text.startswith("not faithful") else f"failed ({type(e).__name__}: {text[:160]})"
