"""Dynamo capture: models with data-dependent control flow, planned one region at a time.

::

    fast(x)  -> torch.compile(_call, backend=RegionPlanner)(root, x)
                dynamo breaks the graph at the branch and hands each region's FX graph
                (torch-level calls, parameters as inputs) to the planner, which runs the
                same passes as ``optimize`` on it with that region's real inputs and budget,
                and returns the rewritten region

The function compiled is ``_call``, defined here rather than inside torch: dynamo skips frames
of torch's own files, so ``model.compile()`` on e.g. ``nn.TransformerEncoder`` captures
nothing. Each region's budget keeps the regions run so far in the call within the model's; a region
dynamo compiles later (a branch first taken during training, a new input shape) is planned
then. The returned ``GraphModule`` calls the compiled function on a view of the model (new
module objects holding the model's own ``_parameters`` / ``_buffers`` dictionaries, no hooks,
see ``approxcompile.module``) and sets the view's ``training`` flag on every call, since dynamo
guards on ``module.training`` only where the code reads it; ``state_dict()`` keys are the
user's (no ``_orig_mod.`` prefix), training and ``.to()`` / ``.double()`` reach the model's
tensors as they do for ``ApproxModule``. It cannot be pickled or deep-copied (the compiled
function and its planned regions live in this process only): that raises ``SaveError``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from approxcompile.errors import SaveError
from approxcompile.module import module_view
from approxcompile.plan import META_KEY, Plan

_SELF = re.compile(r"^L\['self'\]\.?")


def _call(module: nn.Module, args: tuple[Any, ...]) -> Any:
    return module(*args)


class RegionPlanner:
    """The ``torch.compile`` backend: plans and rewrites every region graph it is given."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.settings: tuple[float, Any] | None = None  # (budget, ApproxConfig), set by plan_regions
        self.regions: list[fx.GraphModule] = []
        self.owner: fx.GraphModule | None = None
        self.ran: list[int] = []  # regions run so far in the current call, in order

    def __call__(self, region: fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        if self.settings is None:  # not planned yet: run exact
            return region.forward
        from approxcompile.passes.regions import plan_region

        for node in region.graph.nodes:  # module paths as the user writes them
            stack = node.meta.get("nn_module_stack")
            if stack:
                node.meta["nn_module_stack"] = {k: (_SELF.sub("", p), c) for k, (p, c) in stack.items()}
        budget, config = self.settings
        before = [self.regions[i].meta[META_KEY] for i in self.ran]
        spent = (sum(p.approx_flops for p in before), sum(p.dense_flops for p in before))
        index = len(self.regions)
        plan_region(region, example_inputs, budget=budget, config=config, index=index, spent=spent)
        self.regions.append(region)
        if self.owner is not None:
            self.owner.meta["approxcompile"] = self.plan()
        root = self.root

        ran = self.ran

        def run(*args: Any) -> Any:
            ran.append(index)
            region.training = root.training  # sampled ops read the region's own flag
            return region.forward(*args)

        return run

    def plan(self) -> Any:
        """One ``Plan`` over the regions compiled so far."""
        plans = [r.meta[META_KEY] for r in self.regions if META_KEY in r.meta]
        budget = self.settings[0] if self.settings else 1.0
        nodes = tuple(n for p in plans for n in p.nodes)
        base = plans[0] if plans else Plan(budget=budget, method="topk", nodes=(), other_flops=0)
        base = dataclasses.replace(base, budget=budget)
        return dataclasses.replace(
            base,
            nodes=nodes,
            other_flops=sum(p.other_flops for p in plans),
            note=None if nodes else "no region compiled yet: regions are planned when dynamo compiles them",
            frontend="dynamo",
            frontend_reason=self.owner.meta["approxcompile.capture"].reason if self.owner is not None else "",
        )


class _Runner:
    """What the graph calls: the compiled ``_call`` on the root, in the graph module's mode."""

    def __init__(self, planner: RegionPlanner) -> None:
        self.planner = planner
        self.compiled = torch.compile(_call, backend=planner, dynamic=False)

    def __call__(self, training: bool, *args: Any) -> Any:
        self.planner.root.train(training)
        self.planner.ran.clear()
        return self.compiled(self.planner.root, args)


class DynamoModule(fx.GraphModule):
    """The dynamo frontend's result: runs the model through the compiled, planned regions."""

    def __reduce__(self) -> Any:
        raise SaveError(
            f"{type(self).__name__} was captured by the dynamo frontend (data-dependent control flow): "
            "its planned regions live in the compiled function of this process and cannot be pickled "
            "or deep-copied. Save fast.state_dict() (the model's keys) and the plan "
            "(approxcompile.save_plan), and call approxcompile.optimize(model, plan=...) again after "
            "loading; or make the branch traceable (torch.cond) so another frontend captures it"
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return self.__reduce__()


def capture_dynamo(model: nn.Module, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """A ``GraphModule`` over a view of ``model`` (its tensor dictionaries) that runs it through dynamo."""
    root = module_view(model, share_dicts=True, hooks=False)
    planner = RegionPlanner(root)
    graph = fx.Graph()
    inputs = [graph.placeholder(f"input_{i}") for i in range(len(example_inputs))]
    training = graph.create_node("get_attr", "training", name="training")
    runner = graph.create_node("get_attr", "_approx_runner", name="runner")
    graph.output(graph.call_method("__call__", (runner, training, *inputs)))
    gm = DynamoModule(root, fx.Graph(), type(model).__name__)
    gm.__dict__["_approx_runner"] = _Runner(planner)
    gm.graph = graph
    # The view's own dictionaries, which are the model's: state_dict() keys, training and
    # .to() / .double() reach the user's tensors (the graph itself reads no tensor).
    for attr in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
        gm.__dict__[attr] = root.__dict__[attr]
    gm.meta["approxcompile.planner"] = planner
    planner.owner = gm
    gm.train(model.training)
    return gm


def plan_regions(gm: fx.GraphModule, example_inputs: Sequence[Any], *, budget: float, config: Any) -> None:
    """Arm the planner and compile the regions the example inputs reach in training mode.

    Training mode with autograd on, as the step will run (dynamo guards on grad mode and, where
    read, on ``training``); buffers and the RNG state are put back afterwards.
    """
    planner: RegionPlanner = gm.meta["approxcompile.planner"]
    planner.settings = (budget, config)
    buffers = [(b, b.detach().clone()) for b in gm.buffers()]
    was = gm.training
    gm.train()
    try:
        with torch.random.fork_rng(), torch.enable_grad():
            gm(*example_inputs)
    finally:
        gm.train(was)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    gm.meta["approxcompile"] = planner.plan()
