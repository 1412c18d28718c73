"""Data-parallel training of a sampled model: all-reduce only the gradient slices sampled this step.

With ``ApproxConfig(scores="weights")`` every rank samples the same columns (linear) or input
channels (conv) of a weight, so that weight's gradient is zero outside them on every rank
and the all-reduce can skip the zeros. :func:`register` installs a DDP communication hook
(``DistributedDataParallel.register_comm_hook``, as PyTorch's PowerSGD hook) that, per bucket,

- gathers the sampled slices of each *compressible* weight's gradient and the full gradient
  of every other parameter (biases, exact layers, norms) into one flat tensor,
- all-reduces it (sum, then ``/ world_size``, as DDP's default hook),
- writes it back into the bucket: the sampled slices, zeros elsewhere.

The result equals a plain all-reduce of the whole gradient. Which slices were sampled is
the contract with the sampled ops: each records ``(weight, indices)`` in
``approxcompile.ops.shared``; the hook takes the union since the last all-reduce.

A weight is compressible when it is used exactly once in the graph, as the weight of a
``sampled_linear`` / ``sampled_conv`` call with ``scores='weights'``; a weight also used
elsewhere (tied embeddings, an exact second use) keeps its full all-reduce.

Failure behaviour: :func:`register` all-gathers a fingerprint of the rewritten graph (its
code carries every keep ratio, method and seed) and raises :class:`DistributedError` naming
the ranks whose plan differs, before the first step. Each bucket carries a checksum of its
sampled indices; ranks that sampled differently fail that step. A collective that fails
(a rank died; the process group's ``timeout`` ran out) raises :class:`DistributedError`
from ``loss.backward()`` instead of hanging.

Usage under ``torchrun --nproc_per_node N train.py``::

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    fast = approxcompile.optimize(model, 0.4, example_inputs=(x,), config=ApproxConfig(scores="weights"))
    ddp = DistributedDataParallel(fast)
    stats = approxcompile.distributed.register(ddp)
    ...  # train as usual; stats.last_fraction is the share of the dense bytes sent last step
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from approxcompile import ops
from approxcompile.errors import ApproxCompileError
from approxcompile.ops import shared
from approxcompile.plan import META_KEY

_STATS_ATTR = "_approxcompile_comm_stats"  # set on the DDP wrapper by register(), so a second call finds it
_CHECK_MOD = 65521  # checksum values stay exact in float32 after a sum over up to 256 ranks


class DistributedError(ApproxCompileError, RuntimeError):
    """Ranks disagree on the plan or the sample, or a collective failed (a rank died, timed out)."""


@dataclass
class CommStats:
    """Bytes the hook all-reduced, against what DDP's default hook would have sent."""

    world_size: int
    compressed: tuple[str, ...]  # the weights whose gradients are cut to their sampled slices
    steps: int = 0
    dense_bytes: int = 0  # cumulative, every bucket in full
    sent_bytes: int = 0  # cumulative, what went through the all-reduce
    last_dense_bytes: int = 0  # the last completed step
    last_sent_bytes: int = 0
    last_buckets: int = 0
    _step_buckets: int = field(default=0, repr=False)
    _step_dense: int = field(default=0, repr=False)
    _step_sent: int = field(default=0, repr=False)

    @property
    def last_fraction(self) -> float:
        return self.last_sent_bytes / self.last_dense_bytes if self.last_dense_bytes else 1.0

    def _add(self, dense: int, sent: int, last_bucket: bool) -> None:
        self._step_dense += dense
        self._step_sent += sent
        self._step_buckets += 1
        if last_bucket:
            self.steps += 1
            self.dense_bytes += self._step_dense
            self.sent_bytes += self._step_sent
            self.last_dense_bytes, self.last_sent_bytes = self._step_dense, self._step_sent
            self.last_buckets = self._step_buckets
            self._step_dense = self._step_sent = self._step_buckets = 0


@dataclass
class _HookState:
    group: Any
    world_size: int
    rank: int
    names: dict[int, str]  # id(weight) -> qualified name, for the compressible weights
    stats: CommStats


def compressible_weights(gm: fx.GraphModule) -> dict[str, nn.Parameter]:
    """Weights whose gradient is zero outside the slices their one sampled op records.

    ``fc.weight`` qualifies when it requires a gradient and the graph reads it once, as the
    weight operand of a ``sampled_linear`` / ``sampled_conv`` call with ``scores='weights'``.
    """
    uses: dict[int, int] = {}
    candidates: dict[str, nn.Parameter] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            for p in gm.get_submodule(node.target).parameters():
                uses[id(p)] = uses.get(id(p), 0) + 1
        elif node.op == "get_attr" and isinstance(_attr(gm, node.target), nn.Parameter):
            p = _attr(gm, node.target)
            uses[id(p)] = uses.get(id(p), 0) + len(node.users)
            user = next(iter(node.users), None)
            if (
                len(node.users) == 1
                and user is not None
                and user.target in (ops.sampled_linear, ops.sampled_conv)
                and user.kwargs.get("scores") == "weights"
                and len(user.args) > 1
                and user.args[1] is node
            ):
                candidates[node.target] = p
    # A frozen weight has no gradient: DDP leaves it out of its buckets, so there is nothing to cut.
    return {name: p for name, p in candidates.items() if uses[id(p)] == 1 and p.requires_grad}


def _attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def plan_fingerprint(gm: fx.GraphModule) -> str:
    """Hash of the rewritten code (keep ratios, methods, seeds) and of the parameter shapes."""
    h = hashlib.sha256(gm.code.encode())
    for name, p in gm.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    return h.hexdigest()[:16]


def _check_same_plan(gm: fx.GraphModule, group: Any, rank: int, world: int) -> None:
    mine = plan_fingerprint(gm)
    everyone: list[Any] = [None] * world
    try:
        dist.all_gather_object(everyone, mine, group=group)
    except Exception as e:
        raise DistributedError(
            f"[distributed] rank {rank}: exchanging plan fingerprints failed ({e}); a rank died or "
            "never called register()"
        ) from e
    differ = [r for r, f in enumerate(everyone) if f != everyone[0]]
    if differ:
        raise DistributedError(
            f"[distributed] ranks {differ} run a different plan than rank 0 (fingerprints {everyone}): "
            "the budget, config, seed, example input shapes or model differ across ranks; build the "
            "model with the same optimize() arguments on every rank"
        )


def register(ddp: DistributedDataParallel, *, process_group: Any = None) -> CommStats:
    """Install the sampled all-reduce hook on ``ddp`` (which wraps an ``optimize()`` result).

    Collective: every rank must call it. Returns the live :class:`CommStats`. Calling it
    again on the same ``ddp`` returns the same stats (DDP takes one hook per model).
    """
    if not isinstance(ddp, DistributedDataParallel):
        raise DistributedError(
            "[distributed] register() takes the DistributedDataParallel wrapper, not a "
            f"{type(ddp).__name__}: call register(DistributedDataParallel(approxcompile.optimize(...)))"
        )
    registered = getattr(ddp, _STATS_ATTR, None)
    if registered is not None:
        return registered
    gm = ddp.module
    if not isinstance(gm, fx.GraphModule) or META_KEY not in gm.meta:
        raise DistributedError(
            "[distributed] register() needs DistributedDataParallel(approxcompile.optimize(...)); the "
            f"wrapped module is a {type(gm).__name__} without an approxcompile plan"
        )
    group = process_group if process_group is not None else dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    _check_same_plan(gm, group, rank, world)
    weights = compressible_weights(gm)
    for p in weights.values():
        shared.watch(p)
    stats = CommStats(world_size=world, compressed=tuple(sorted(weights)))
    names = {id(p): name for name, p in weights.items()}
    try:
        ddp.register_comm_hook(_HookState(group, world, rank, names, stats), sampled_allreduce_hook)
    except RuntimeError as e:  # DDP's reducer takes one hook: someone registered another
        for p in weights.values():
            shared.unwatch(p)
        raise DistributedError(
            f"[distributed] register(): this DistributedDataParallel already has a communication hook "
            f"({e}); DDP takes one per model, so wrap the model in a fresh DistributedDataParallel or "
            "drop the other hook"
        ) from e
    setattr(ddp, _STATS_ATTR, stats)
    return stats


def _checksum(check: Tensor, index: Tensor) -> Tensor:
    """Fold ``index`` into ``check`` on its device (no host sync before the all-reduce)."""
    return (check * 31 + index.numel() * 7919 + index.sum()) % _CHECK_MOD


def sampled_allreduce_hook(state: _HookState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """Average the bucket over ranks, sending only the sampled slices of compressible weights."""
    buffer = bucket.buffer()
    pieces: list[Tensor] = []
    layout: list[tuple[Tensor, Tensor | None]] = []  # (the parameter's view of the buffer, index)
    check = torch.zeros((), dtype=torch.int64, device=buffer.device)
    offset = 0
    for param in bucket.parameters():
        view = buffer.narrow(0, offset, param.numel()).view(param.shape)
        offset += param.numel()
        index = shared.take(param) if id(param) in state.names else None
        if index is not None and index.numel() < param.shape[1]:
            pieces.append(view.index_select(1, index).reshape(-1))
            check = _checksum(check, index)
        else:
            pieces.append(view.reshape(-1))
            index = None
        layout.append((view, index))
    checked = buffer.dtype in (torch.float32, torch.float64)
    pieces.append((check if checked else torch.zeros_like(check)).to(buffer.dtype).view(1))
    compact = torch.cat(pieces)
    state.stats._add(
        buffer.numel() * buffer.element_size(), compact.numel() * compact.element_size(), bucket.is_last()
    )
    work = dist.all_reduce(compact, group=state.group, async_op=True)

    def unpack(fut: torch.futures.Future[list[Tensor]]) -> Tensor:
        try:
            reduced = fut.value()[0]
        except Exception as e:
            raise DistributedError(
                f"[distributed] rank {state.rank}: the all-reduce of gradient bucket {bucket.index()} "
                f"failed ({e}); another rank probably died or timed out. Restart the job; pass "
                "timeout= to init_process_group to fail sooner"
            ) from e
        if checked and int(reduced[-1]) != int(check) * state.world_size:
            raise DistributedError(
                f"[distributed] rank {state.rank}: ranks sampled different slices in bucket "
                f"{bucket.index()} (index checksums disagree); their weights, configs or sampling seeds "
                "differ. Build every rank's model with the same optimize() arguments"
            )
        reduced = reduced[:-1].div_(state.world_size)
        at = 0
        for view, index in layout:
            n = view.numel() if index is None else view.numel() // view.shape[1] * index.numel()
            piece = reduced[at : at + n]
            at += n
            if index is None:
                view.copy_(piece.view(view.shape))
            else:
                # Zero first: the slices nobody sampled are zero on every rank anyway, and
                # writing zeros keeps ranks identical even if something else touched them.
                cols = piece.view(view.shape[0], index.numel(), *view.shape[2:])
                view.zero_().index_copy_(1, index, cols)
        return buffer

    return work.get_future().then(unpack)


# DDP checks the hook's annotations by identity; under `from __future__ import annotations`
# they are strings, so give it the objects.
sampled_allreduce_hook.__annotations__.update(
    {"bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}
)
