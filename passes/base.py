"""What every pass returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx


@dataclass(frozen=True)
class PassResult:
    """The module a pass produced, whether it changed the graph, and its statistics."""

    graph_module: fx.GraphModule
    modified: bool
    stats: Mapping[str, Any] = field(default_factory=dict)
