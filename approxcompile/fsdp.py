"""Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) on a rewritten model.

Whole model: ``fully_shard(fast)`` works as is: the root's forward pre-hook gathers every
parameter, the sampled ops read them, backward reduce-scatters the gradients.

Per block it does not: the rewritten graph reads a sampled layer's weight with ``get_attr``
and calls ``sampled_linear`` on it, so ``fast.layers[1]``'s forward never runs and FSDP's
hooks on it (gather before, reshard and reduce-scatter after) never fire. :func:`shard_blocks`
first cuts the graph into one submodule per block,

    fast (layers.0.weight, layers.1.weight, ...) -> split: submod_0 (layers.0.*), submod_1 (layers.1.*), ...

each a ``GraphModule`` holding the *same* parameter objects under their original names and
called once from the root, then shards each piece and the root. ``plain_state_dict`` drops
the ``submod_<i>.`` prefixes again, so a checkpoint has the plain model's keys.

:class:`SampledReduceScatter` carries the sampled all-reduce idea over to FSDP's gradient
reduction: FSDP shards every parameter by rows (dim 0), so each rank's shard of a sampled
weight holds all its columns, of which only the sampled ones are nonzero; the custom
reduce-scatter sends those columns alone (``FSDPModule.set_custom_reduce_scatter``).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import Tensor, nn

from approxcompile.distributed import DistributedError, compressible_weights
from approxcompile.ops import shared

_PIECE = re.compile(r"^submod_\d+\.")


def _owner(node: fx.Node, blocks: Sequence[str]) -> int | None:
    """Index of the block whose parameters or submodule ``node`` reads, if any."""
    if node.op not in ("get_attr", "call_module"):
        return None
    target = str(node.target)
    for i, block in enumerate(blocks):
        if target == block or target.startswith(block + "."):
            return i
    return None


def split_blocks(fast: fx.GraphModule, blocks: Sequence[str]) -> fx.GraphModule:
    """``fast`` -> a root calling one ``GraphModule`` per block, in graph order (same parameters).

    A block starts at the first node that reads its parameters and runs until the next
    block starts; nodes before the first block join it. Raises :class:`DistributedError` if
    a block's parameters are read again after a later block started (a tied weight, a
    residual reading a weight): that parameter would be gathered by two FSDP units.
    """
    if not blocks:
        raise DistributedError("[fsdp] shard_blocks(): give the blocks' module names, e.g. ['layers.0', ...]")
    known = {name for name, _ in fast.named_modules()}
    missing = [b for b in blocks if b not in known]
    if missing:
        raise DistributedError(
            f"[fsdp] shard_blocks(): {missing} are not submodules of the rewritten model; pick from "
            f"{sorted(n for n in known if n)[:12]}"
        )
    owners: dict[int, str] = {}
    for block in blocks:
        for name, param in fast.get_submodule(block).named_parameters():
            other = owners.setdefault(id(param), block)
            if other != block:
                raise DistributedError(
                    f"[fsdp] shard_blocks(): {block}.{name} is also a parameter of block {other!r} (tied "
                    "weights); two FSDP units cannot share it: shard the whole model, or put both in one "
                    "block"
                )
    part: dict[fx.Node, int] = {}
    piece_of: dict[int, int] = {}  # block index -> its piece, numbered in graph order
    current = 0
    for node in fast.graph.nodes:
        owner = _owner(node, blocks)
        if owner is not None:
            if owner not in piece_of:
                piece_of[owner] = current = len(piece_of)
            elif piece_of[owner] != current:
                raise DistributedError(
                    f"[fsdp] shard_blocks(): node {node.name} reads {node.target} of block {blocks[owner]!r} "
                    "after a later block started; shard the whole model instead, or name a block that "
                    "holds both uses"
                )
        part[node] = current
    if len(piece_of) < 2:
        raise DistributedError(
            f"[fsdp] shard_blocks(): the graph reads parameters of one block only ({blocks})"
        )
    return _outline(fast, part)


def _outline(fast: fx.GraphModule, part: dict[fx.Node, int]) -> fx.GraphModule:
    """Move each piece's nodes into a ``GraphModule`` ``submod_<i>`` the root calls in order.

    A piece's ``get_attr`` / ``call_module`` nodes stay inside it (``torch.fx``'s own
    ``split_module`` lifts ``get_attr`` into the root, which would leave the weights with the
    root's FSDP unit), under their original dotted names, on the same parameter objects.
    """
    root_graph = fx.Graph()
    holder = nn.Module()
    in_root: dict[fx.Node, fx.Node] = {}
    nodes = list(fast.graph.nodes)
    for node in nodes:
        if node.op == "placeholder":
            in_root[node] = root_graph.node_copy(node)
    for piece in sorted(set(part[n] for n in nodes if n.op not in ("placeholder", "output"))):
        body = [n for n in nodes if part[n] == piece and n.op not in ("placeholder", "output")]
        members = set(body)
        inputs = list(dict.fromkeys(i for n in body for i in n.all_input_nodes if i not in members))
        outputs = [n for n in body if any(u not in members for u in n.users)]
        graph = fx.Graph()
        env = {i: graph.placeholder(i.name) for i in inputs}
        for n in body:
            env[n] = graph.node_copy(n, env.__getitem__)
        graph.output(tuple(env[o] for o in outputs))
        name = f"submod_{piece}"
        holder.add_module(name, fx.GraphModule(fast, graph, class_name=f"Piece{piece}"))
        call = root_graph.call_module(name, tuple(in_root[i] for i in inputs))
        for k, o in enumerate(outputs):
            in_root[o] = root_graph.call_function(operator.getitem, (call, k))
    (out,) = (n for n in nodes if n.op == "output")
    root_graph.output(fx.map_arg(out.args[0], lambda a: in_root[a]))
    return fx.GraphModule(holder, root_graph, class_name="ShardedBlocks")


def shard_blocks(fast: fx.GraphModule, blocks: Sequence[str], **fsdp_kwargs: Any) -> nn.Module:
    """Split ``fast`` per block (:func:`split_blocks`), ``fully_shard`` each piece, then the root."""
    from torch.distributed.fsdp import fully_shard

    root = split_blocks(fast, blocks)
    for name, child in root.named_children():
        if name.startswith("submod_"):
            fully_shard(child, **fsdp_kwargs)
    fully_shard(root, **fsdp_kwargs)
    return root


def plain_state_dict(module: nn.Module) -> dict[str, Any]:
    """``module.state_dict()`` under the plain model's keys (``submod_<i>.`` prefixes dropped)."""
    return {_PIECE.sub("", key): value for key, value in module.state_dict().items()}


@dataclass
class ReduceStats:
    """Elements FSDP's reduce-scatter would send, and what :class:`SampledReduceScatter` sent."""

    calls: int = 0
    dense_elements: int = 0  # cumulative: every gradient in full (padded, all ranks' chunks)
    sent_elements: int = 0  # cumulative: what went into the reduce-scatter

    @property
    def fraction(self) -> float:
        return self.sent_elements / self.dense_elements if self.dense_elements else 1.0


class SampledReduceScatter:
    """FSDP2 reduce-scatter that sends only the sampled columns of compressible weights.

    FSDP lays the reduce-scatter input out as ``world`` equal chunks, chunk ``r`` holding
    rank ``r``'s row-shard of every gradient (padded to equal rows). A compressible weight's
    gradient is zero outside its sampled columns (:func:`compressible_weights`; the same
    columns on every rank), so each chunk keeps those columns only, the compact chunks go
    through the reduce-scatter and the result is written back with zeros elsewhere: the same
    values as the dense reduce-scatter. Any gradient layout it does not recognise (a frozen
    or unused parameter left out of this reduction) goes through in full.

    Install with :func:`compress_reduce_scatter`; the first step is dense (FSDP creates the
    gathered parameters, whose sampled columns the ops record, on its first forward).
    """

    def __init__(self, fsdp_params: Sequence[Any], compressible: set[int], stats: ReduceStats) -> None:
        self.fsdp_params = list(fsdp_params)
        self.compressible = compressible  # positions in fsdp_params
        self.stats = stats

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def _columns(self, position: int, fsdp_param: Any) -> Tensor | None:
        if position not in self.compressible:
            return None
        weight = fsdp_param.unsharded_param  # what the graph's get_attr returned in forward
        index = shared.take(weight)
        shared.watch(weight)  # idempotent; the first step has nothing recorded yet
        return index

    def __call__(
        self, output_tensor: Tensor, input_tensor: Tensor, group: Any, op: Any, async_op: bool = False
    ) -> None:
        world = dist.get_world_size(group)
        shapes = [tuple(fp.padded_sharded_param_size) for fp in self.fsdp_params]
        sizes = [int(torch.Size(s).numel()) for s in shapes]
        chunks = input_tensor.view(world, -1)
        self.stats.calls += 1
        self.stats.dense_elements += input_tensor.numel()
        if sum(sizes) != chunks.shape[1]:  # not every parameter has a gradient: send it all
            for position, fp in enumerate(self.fsdp_params):
                self._columns(position, fp)  # drop this step's records, or they pile up
            self.stats.sent_elements += input_tensor.numel()
            dist.reduce_scatter_single(output_tensor, input_tensor, op=op, group=group)
            return
        pieces, layout, offset = [], [], 0
        for position, (fp, shape, n) in enumerate(zip(self.fsdp_params, shapes, sizes, strict=True)):
            segment = chunks[:, offset : offset + n].view(world, *shape)
            index = self._columns(position, fp) if len(shape) >= 2 else None
            if index is not None and index.numel() < shape[1]:
                pieces.append(segment.index_select(2, index).reshape(world, -1))
            else:
                pieces.append(segment.reshape(world, -1))
                index = None
            layout.append((offset, shape, index))
            offset += n
        compact = torch.cat(pieces, dim=1)
        reduced = compact.new_empty(compact.shape[1])
        self.stats.sent_elements += compact.numel()
        dist.reduce_scatter_single(reduced, compact.reshape(-1), op=op, group=group)
        at = 0
        for offset, shape, index in layout:
            n = int(torch.Size(shape).numel())
            out = output_tensor[offset : offset + n].view(shape)
            if index is None:
                out.copy_(reduced[at : at + n].view(shape))
                at += n
            else:
                k = n // shape[1] * index.numel()
                out.zero_().index_copy_(
                    1, index, reduced[at : at + k].view(shape[0], index.numel(), *shape[2:])
                )
                at += k


def compress_reduce_scatter(module: nn.Module, fast: fx.GraphModule) -> ReduceStats:
    """Give every FSDP unit in ``module`` (``fast`` after ``fully_shard``) a :class:`SampledReduceScatter`.

    Call after ``fully_shard`` and before the first step; every rank must do the same.
    """
    from torch.distributed.fsdp import FSDPModule

    names = set(compressible_weights(fast))
    where = {id(m): _PIECE.sub("", name + ".") for name, m in module.named_modules()}  # "layers.1."
    stats = ReduceStats()
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not units:
        raise DistributedError("[fsdp] compress_reduce_scatter(): call fully_shard(...) on the module first")
    for unit in units:
        group = unit._get_fsdp_state()._fsdp_param_group  # no public accessor for a unit's parameters
        if group is None:
            continue  # a unit that holds no parameters of its own
        positions = {
            i
            for i, fp in enumerate(group.fsdp_params)
            if where.get(id(fp._module_info.module), "?").lstrip(".") + fp._module_info.param_name in names
        }
        unit.set_custom_reduce_scatter(SampledReduceScatter(group.fsdp_params, positions, stats))  # type: ignore[arg-type]
    return stats
