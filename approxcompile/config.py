r"""What the user asks for: the sampling method, exclusions and per-node overrides.

Overrides resolve field by field with QConfigMapping's precedence, lowest first:
global defaults < op type < module-name regex < module name. A field left at
``None`` in an override inherits from the level below it.

>>> cfg = (ApproxConfig(method="topk")
...        .set_op_type("conv", NodeOverride(min_k=16))
...        .set_module_name_regex(r"head\\..*", NodeOverride(exact=True))
...        .set_module_name("features.3", NodeOverride(keep=0.5, method="crs")))
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from torch import nn

from approxcompile import kinds
from approxcompile.choices import (
    ATTENTIONS,
    FRONTENDS,
    METHODS,
    MODES,
    OP_TYPES,
    ROW_SCORES,
    SCORES,
    Attention,
    Method,
    Mode,
    OpType,
    RowScores,
    Scores,
)

OP_KINDS = OP_TYPES  # the op types overrides are keyed by

# Python objects a user may name instead of an op kind string: every matcher's target.
_OP_ALIASES: dict[Any, OpType] = kinds.aliases()


def op_kind(op: str | type | Callable[..., Any]) -> str:
    """Normalise ``"linear"``, ``nn.Linear``, ``F.linear`` ... to one of :data:`OP_KINDS`."""
    if isinstance(op, str):
        if op not in OP_KINDS:
            raise ValueError(f"unknown op type {op!r}; expected one of {OP_KINDS}")
        return op
    try:
        return _OP_ALIASES[op]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown op type {op!r}; expected one of {OP_KINDS} or one of "
            f"{sorted(getattr(k, '__name__', str(k)) for k in _OP_ALIASES)}"
        ) from None


def check_method(method: str) -> Method:
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; expected one of {METHODS}")
    return cast(Method, method)


def check_keep(keep: float, what: str = "keep") -> float:
    if (
        isinstance(keep, bool)
        or not isinstance(keep, numbers.Real)
        or math.isnan(keep)
        or not 0.0 < keep <= 1.0
    ):
        raise ValueError(f"{what} must be a number in (0, 1], got {keep!r}")
    return float(keep)


def _check_int(name: str, value: object, low: int = 1, high: int | None = None) -> None:
    """An integer (not a bool, not a float) in ``[low, high)``, or a ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if int(value) < low or (high is not None and int(value) >= high):
        bound = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


def _check_bool(name: str, value: object, optional: bool = False) -> None:
    if not (isinstance(value, bool) or (optional and value is None)):
        raise ValueError(f"{name} must be True or False{' or None' if optional else ''}, got {value!r}")


def as_override(override: object) -> NodeOverride:
    """A :class:`NodeOverride`, or a dict of its fields (``{"exact": True}``)."""
    if isinstance(override, NodeOverride):
        return override
    if isinstance(override, Mapping):
        fields = {f.name for f in dataclasses.fields(NodeOverride)}
        unknown = sorted(set(override) - fields)
        if unknown:
            raise ValueError(f"unknown override field(s) {unknown}; NodeOverride takes {sorted(fields)}")
        return NodeOverride(**override)
    raise TypeError(
        f"an override must be a NodeOverride or a dict of its fields, got {type(override).__name__}"
    )


@dataclass(frozen=True, kw_only=True)
class NodeOverride:
    """Per-node settings; ``None`` means "inherit".

    exact:  leave the node's operation exact.
    keep:   a fixed keep ratio in (0, 1] instead of the one the budget allocation picks.
    method: the sampling method for this node.
    min_k:  never keep fewer than this many columns / channels.
    row_keep: backward mode, linear and conv nodes: a fixed keep ratio of the weight-gradient
            product's batch rows (dW), apart from ``keep`` (dX's); without it a fixed ``keep``
            pins both. Other nodes and forward mode have no separate dW ratio and ignore it.
    """

    exact: bool | None = None
    keep: float | None = None
    method: Method | None = None
    min_k: int | None = None
    row_keep: float | None = None

    def __repr__(self) -> str:
        set_fields = (f for f in dataclasses.fields(self) if getattr(self, f.name) is not None)
        return f"NodeOverride({', '.join(f'{f.name}={getattr(self, f.name)!r}' for f in set_fields)})"

    def __post_init__(self) -> None:
        _check_bool("NodeOverride.exact", self.exact, optional=True)
        if self.keep is not None:
            check_keep(self.keep, "NodeOverride.keep")
        if self.row_keep is not None:
            check_keep(self.row_keep, "NodeOverride.row_keep")
        if self.method is not None:
            check_method(self.method)
        if self.min_k is not None:
            _check_int("NodeOverride.min_k", self.min_k)


@dataclass(frozen=True, kw_only=True)
class NodeSettings:
    """The settings in force for one node after every override was applied."""

    exact: bool
    keep: float | None
    method: Method
    min_k: int
    source: str  # which override level decided `exact`/`keep`, for the report
    row_keep: float | None = None


@dataclass(frozen=True, kw_only=True)
class ApproxConfig:
    """Everything ``optimize`` can be told, besides the budget.

    method: default sampling method (``topk``, ``crs``, ``bernoulli``, ``uniform``, ``wta_crs``).
    exclude_first_last: keep the first and last candidate node exact (as the paper does).
    min_inner: inner dimensions (features, channels) below this are not sampled.
    min_k: never keep fewer than this many columns / channels.
    keep_grid: the keep ratios the budget allocation chooses from.
    align: kept counts the allocation picks are rounded to multiples of this (GEMM and
        convolution kernels run whole vector widths); on a CPU a convolution's kept channels
        are also rounded to whole oneDNN channel blocks (16 with AVX-512, see
        ``plan.conv_align``); 1 turns rounding off. Fixed keep ratios from overrides are
        never rounded.
    eps: weight of the uniform distribution mixed into ``crs`` / ``bernoulli`` probabilities.
    sensitivity_draws: draws averaged when measuring the error of a random method.
    seed: seed of the private generator used while measuring sensitivities.
    leaf_modules: module types torch.fx should not trace into (``frontend="fx"``).
    frontend: how the model becomes a graph: ``fx`` (symbolic tracing), ``export``
        (torch.export, one graph per mode), ``dynamo`` (torch.compile, for data-dependent
        control flow) or ``auto`` (fx where it is faithful, else export, else dynamo).
    measure_time: time every candidate node dense and sampled on the example inputs and
        never pick a keep ratio that is not faster than the dense op (see passes/timing.py).
    time_repeats: timed runs per (node, keep ratio) when ``measure_time`` is on; the median counts.
    mode: ``forward`` samples the forward product (and backpropagates through the sample);
        ``backward`` keeps the forward exact and samples the input- and weight-gradient
        products of linear and conv nodes; it needs an unbiased ``method`` (not ``topk``).
    scores: ``activations`` scores pair i by ``|x[:, i]|·|W[:, i]|``; ``weights`` by
        ``|W[:, i]|`` alone, and random methods then draw from a per-weight generator seeded
        with ``seed`` and the node's name, so every data-parallel rank picks the same slices
        (linear and conv nodes; forward mode only). See ``approxcompile.distributed``.
    row_scores: backward mode's score of batch row b for the weight gradient: ``x_dy``
        (``|X[b]|·|dY[b]|``, saves all of X) or ``x`` (``|X[b]|``, drawn in the forward pass,
        saves only the sampled rows).
    weight_norms_every: forward-sampled linear and conv nodes score pair i with their weight's
        column (channel) norm ``|W[:, i]|``; 1 recomputes it every step, N > 1 reuses it until
        the weight has been updated N times in place (its version counter: an optimizer step
        is one update or a few), eager only (compiled graphs recompute). The estimators stay
        what they are: the probabilities are computed from, and scaled by, the norms used.
        The weight-sized pass this skips costs about as much as a small layer's sampling
        saves (batch 50, 500-wide: docs/performance.md).
    attention: ``exact`` leaves ``scaled_dot_product_attention`` as the fused kernel (the
        report says why); ``decomposed`` makes it a candidate whose two products (Q·Kᵀ over
        the head dimension, P·V over the key positions) are sampled per (batch, head) when
        the allocation chooses to (in training; eval runs the fused kernel).
    """

    method: Method = "topk"
    exclude_first_last: bool = True
    min_inner: int = 16
    min_k: int = 4
    keep_grid: tuple[float, ...] = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05)
    align: int = 8
    eps: float = 0.1
    sensitivity_draws: int = 3
    seed: int = 0
    leaf_modules: tuple[type[nn.Module], ...] = ()
    frontend: str = "auto"
    measure_time: bool = False
    time_repeats: int = 3
    mode: Mode = "forward"
    scores: Scores = "activations"
    row_scores: RowScores = "x_dy"
    attention: Attention = "exact"
    weight_norms_every: int = 1
    op_type_overrides: tuple[tuple[str, NodeOverride], ...] = field(default=(), repr=False)
    module_name_regex_overrides: tuple[tuple[str, NodeOverride], ...] = field(default=(), repr=False)
    module_name_overrides: tuple[tuple[str, NodeOverride], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        check_method(self.method)
        # Every field is checked here, so a typo fails where it is made, not deep in a pass.
        for name in ("keep_grid", "leaf_modules"):
            if isinstance(getattr(self, name), list):  # frozen: lists would be unhashable
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if not isinstance(self.keep_grid, tuple) or not self.keep_grid:
            raise ValueError(
                f"keep_grid must be a non-empty tuple of ratios in (0, 1], got {self.keep_grid!r}"
            )
        for k in self.keep_grid:
            check_keep(k, "every keep_grid entry")
        if isinstance(self.eps, bool) or not isinstance(self.eps, numbers.Real) or not 0.0 <= self.eps < 1.0:
            raise ValueError(f"eps must be a number in [0, 1), got {self.eps!r}")
        ints = ("min_k", "min_inner", "align", "sensitivity_draws", "time_repeats", "weight_norms_every")
        for name in ints:
            _check_int(name, getattr(self, name))
        _check_int("seed", self.seed, low=-(2**63))
        if self.seed >= 2**64:  # torch.Generator.manual_seed takes any 64-bit value, signed or not
            raise ValueError(f"seed must fit in 64 bits (below 2**64), got {self.seed!r}")
        _check_bool("exclude_first_last", self.exclude_first_last)
        _check_bool("measure_time", self.measure_time)
        if not isinstance(self.leaf_modules, tuple):
            raise TypeError(
                f"leaf_modules must be a tuple of nn.Module subclasses, got {self.leaf_modules!r}"
            )
        for level, entries in self.overrides.items():
            for key, o in entries:
                if not isinstance(key, str) or not isinstance(o, NodeOverride):
                    raise TypeError(
                        f"{level} overrides must be (str, NodeOverride) pairs, got ({key!r}, {o!r}); "
                        "use the set_op_type / set_module_name_regex / set_module_name builders"
                    )
        for leaf in self.leaf_modules:
            if not (isinstance(leaf, type) and issubclass(leaf, nn.Module)):
                raise TypeError(f"leaf_modules must hold nn.Module subclasses, got {leaf!r}")
        self._check_modes()

    def _check_modes(self) -> None:
        for name, value, allowed in (
            ("mode", self.mode, MODES),
            ("scores", self.scores, SCORES),
            ("row_scores", self.row_scores, ROW_SCORES),
            ("frontend", self.frontend, FRONTENDS),
            ("attention", self.attention, ATTENTIONS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.mode != "backward":
            return
        if self.scores != "activations":
            raise ValueError(
                "scores='weights' applies to forward sampling only (backward mode scores use dY); "
                "drop scores= or use mode='forward'"
            )
        methods = [("method", self.method)] + [
            (f"override {key!r}", o.method)
            for level in self.overrides.values()
            for key, o in level
            if o.method is not None
        ]
        for where, method in methods:
            if method == "topk":
                raise ValueError(
                    f"mode='backward' needs an unbiased sampling method, but {where} is 'topk' (biased "
                    "gradients drift the training); pass method='bernoulli' (or 'crs', 'uniform', 'wta_crs')"
                )

    # -- builders: each returns a new config, the receiver stays as it was -------------
    def set_op_type(self, op: str | type | Callable[..., Any], override: NodeOverride) -> ApproxConfig:
        entry = (op_kind(op), as_override(override))
        return dataclasses.replace(self, op_type_overrides=(*self.op_type_overrides, entry))

    def set_module_name_regex(self, pattern: str, override: NodeOverride) -> ApproxConfig:
        if not isinstance(pattern, str):
            raise TypeError(f"the module-name regex must be a str, got {type(pattern).__name__}")
        override = as_override(override)
        try:
            re.compile(pattern)  # fail here, not during optimize()
        except re.error as e:
            raise ValueError(f"invalid module-name regex {pattern!r}: {e}") from e
        entry = (pattern, override)
        return dataclasses.replace(
            self, module_name_regex_overrides=(*self.module_name_regex_overrides, entry)
        )

    def set_module_name(self, name: str, override: NodeOverride) -> ApproxConfig:
        if not isinstance(name, str):
            raise TypeError(f"the module name must be a str such as 'features.3', got {type(name).__name__}")
        entry = (name, as_override(override))
        return dataclasses.replace(self, module_name_overrides=(*self.module_name_overrides, entry))

    @property
    def overrides(self) -> dict[str, tuple[tuple[str, NodeOverride], ...]]:
        """All overrides by level, for display."""
        return {
            "op_type": self.op_type_overrides,
            "module_name_regex": self.module_name_regex_overrides,
            "module_name": self.module_name_overrides,
        }

    def resolve(self, *, kind: str, names: tuple[str, ...]) -> NodeSettings:
        """Settings for a node of op ``kind`` known by ``names`` (qualified name, owning module).

        The first matching entry of each level applies; higher levels win field by field.
        """
        levels: list[tuple[str, NodeOverride]] = []
        levels += [("op type", o) for k, o in self.op_type_overrides if k == kind][:1]
        levels += [
            (f"module_name_regex {p!r}", o)
            for p, o in self.module_name_regex_overrides
            if any(re.fullmatch(p, n) for n in names)
        ][:1]
        levels += [(f"module_name {m!r}", o) for m, o in self.module_name_overrides if m in names][:1]
        exact, keep, method, min_k, source = False, None, self.method, self.min_k, "global"
        row_keep = None
        for where, o in levels:
            if o.exact is not None:
                exact, source = o.exact, where
            if o.keep is not None:
                keep, source = o.keep, where
            if o.row_keep is not None:
                row_keep, source = o.row_keep, where
            method = o.method if o.method is not None else method
            min_k = o.min_k if o.min_k is not None else min_k
        return NodeSettings(
            exact=exact, keep=keep, method=method, min_k=min_k, source=source, row_keep=row_keep
        )

    # -- persistence and display ----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON types plus ``"version"``; overrides included, leaf modules by import path.

        >>> ApproxConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        True
        """
        from approxcompile.saving import config_to_dict

        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ApproxConfig:
        """The config :meth:`to_dict` wrote; missing keys take their defaults, unknown keys fail."""
        from approxcompile.saving import config_from_dict

        return config_from_dict(data)

    def __repr__(self) -> str:
        # Only what differs from the defaults, overrides included: the full field list hid them
        # behind a dozen defaults (and left them out entirely).
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            if value != default:
                parts.append(f"{f.name}={value!r}")
        return f"ApproxConfig({', '.join(parts)})"
