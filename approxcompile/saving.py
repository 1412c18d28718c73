"""Configs and plans as JSON: keep a plan and re-apply it without measuring again.

``ApproxConfig.to_dict()`` / ``ApproxConfig.from_dict()`` turn a config into plain JSON types
and back (overrides included; ``leaf_modules`` as ``"package.module:QualName"`` import paths).
``save_plan(fast, path)`` writes the config and the whole plan of an optimized module;
``optimize(model, example_inputs=..., plan=path)`` re-applies it: the same nodes sampled at the
same keep ratios with the same methods, so a resumed job and every data-parallel rank sample
alike, without measuring sensitivities or timings again.

>>> approxcompile.save_plan(fast, "plan.json")
>>> fast = approxcompile.optimize(model, example_inputs=(x,), plan="plan.json")
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from approxcompile.config import ApproxConfig, NodeOverride
from approxcompile.plan import META_KEY, Plan

# Bumped when a key is renamed or removed or changes meaning (adding a key keeps it).
CONFIG_VERSION = 1
PLAN_VERSION = 1
PLAN_FORMAT = "approxcompile-plan"
# optimize() keeps the config it ran with beside the plan, so save_plan can write both.
CONFIG_META_KEY = "approxcompile_config"

_OVERRIDE_LEVELS = ("op_type_overrides", "module_name_regex_overrides", "module_name_overrides")


def _import_path(cls: type) -> str:
    """``torch.nn.modules.conv.Conv2d -> "torch.nn.modules.conv:Conv2d"``; refused for local classes."""
    if "<locals>" in cls.__qualname__ or cls.__module__ == "__main__":
        raise ValueError(
            f"leaf module {cls.__qualname__} cannot be saved: it is defined in __main__ or inside a "
            "function, so no other process can import it; define it at the top level of a module"
        )
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_class(path: str) -> type:
    module, sep, qualname = path.partition(":")
    if not sep:
        raise ValueError(f"leaf module {path!r} is not an import path 'package.module:ClassName'")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"leaf module {path!r} cannot be imported: {e}") from e
    if not isinstance(obj, type):
        raise ValueError(f"leaf module {path!r} is a {type(obj).__name__}, not a class")
    return obj


def _plain(value: Any) -> Any:
    """A field value as JSON types: enums by value, tuples as lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _override_dict(o: NodeOverride) -> dict[str, Any]:
    return {
        f.name: _plain(getattr(o, f.name)) for f in dataclasses.fields(o) if getattr(o, f.name) is not None
    }


def config_to_dict(config: ApproxConfig) -> dict[str, Any]:
    """Every field of ``config`` as JSON types, with ``"version"``; see ``ApproxConfig.to_dict``."""
    out: dict[str, Any] = {"version": CONFIG_VERSION}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "leaf_modules":
            out[f.name] = [_import_path(c) for c in value]
        elif f.name in _OVERRIDE_LEVELS:
            out[f.name] = [[_plain(key), _override_dict(o)] for key, o in value]
        else:
            out[f.name] = _plain(value)
    return out


def config_from_dict(data: dict[str, Any]) -> ApproxConfig:
    """The config ``config_to_dict`` wrote; missing keys take their defaults, unknown keys fail."""
    if not isinstance(data, dict):
        raise ValueError(f"a config must be a JSON object, got {type(data).__name__}")
    data = dict(data)
    version = data.pop("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise ValueError(
            f"config version {version!r} is not supported (this approxcompile reads version "
            f"{CONFIG_VERSION}); write the config again with this version"
        )
    names = {f.name for f in dataclasses.fields(ApproxConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown ApproxConfig keys {unknown}; known keys: {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name == "leaf_modules":
            kwargs[name] = tuple(_import_class(p) for p in value)
        elif name in _OVERRIDE_LEVELS:
            kwargs[name] = tuple((key, _override_from(o, name, key)) for key, o in value)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return ApproxConfig(**kwargs)


def _override_from(data: Any, level: str, key: str) -> NodeOverride:
    if not isinstance(data, dict):
        raise ValueError(f"{level} entry {key!r}: expected an object of NodeOverride fields, got {data!r}")
    try:
        return NodeOverride(**data)
    except TypeError as e:
        raise ValueError(f"{level} entry {key!r}: {e}") from e


@dataclass(frozen=True, kw_only=True)
class SavedPlan:
    """A plan read back from ``save_plan``: the config it was made with and every node's decision."""

    config: ApproxConfig
    plan: Plan

    def to_dict(self) -> dict[str, Any]:
        """JSON types: ``format``, ``version``, ``approxcompile`` (writer's version), ``config``, ``plan``."""
        from approxcompile import __version__
        from approxcompile.report import Report

        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "approxcompile": __version__,
            "config": config_to_dict(self.config),
            "plan": Report(self.plan).to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SavedPlan:
        from approxcompile.report import Report

        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ValueError(
                f'not an approxcompile plan (expected "format": {PLAN_FORMAT!r}); write one with '
                "approxcompile.save_plan(fast, path) or `approxcompile inspect ... --save-plan FILE`"
            )
        if data.get("version") != PLAN_VERSION:
            raise ValueError(
                f"plan version {data.get('version')!r} is not supported (this approxcompile reads "
                f"version {PLAN_VERSION}); optimize again and save a new plan"
            )
        return cls(config=config_from_dict(data["config"]), plan=Report.from_dict(data["plan"]).plan)


def saved_plan(fast: Any) -> SavedPlan:
    """The config and plan ``optimize`` stored on ``fast`` (a module it returned)."""
    meta = getattr(fast, "meta", None)
    plan = meta.get(META_KEY) if isinstance(meta, dict) else None
    config = meta.get(CONFIG_META_KEY) if isinstance(meta, dict) else None
    if not isinstance(plan, Plan) or not isinstance(config, ApproxConfig):
        raise ValueError(
            f"{type(fast).__name__} was not produced by approxcompile.optimize (no plan in its meta); "
            "pass the module that optimize() returned"
        )
    return SavedPlan(config=config, plan=plan)


def save_plan(fast: Any, path: str | os.PathLike[str]) -> Path:
    """Write the plan of ``fast`` (returned by ``optimize``) as JSON to ``path``; returns the path."""
    path = Path(path)
    text = json.dumps(saved_plan(fast).to_dict(), indent=2) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a reader never sees half a plan
    return path


def load_plan(source: SavedPlan | dict[str, Any] | str | os.PathLike[str] | Any) -> SavedPlan:
    """A :class:`SavedPlan` from a path, a ``to_dict()`` dict, or a module ``optimize`` returned."""
    if isinstance(source, SavedPlan):
        return source
    if isinstance(source, dict):
        return SavedPlan.from_dict(source)
    if isinstance(source, str | os.PathLike):
        try:
            data = json.loads(Path(source).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"plan file {os.fspath(source)} is not JSON: {e}") from e
        return SavedPlan.from_dict(data)
    return saved_plan(source)
