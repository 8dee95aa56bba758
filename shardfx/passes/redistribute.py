"""The redistributions placements need, one function each, shared by every pass that moves tensors.

Each inserts, at the graph's insertion point, the collective that changes a
placement on one mesh axis, tags it with its role (meta.ROLE: PARAM_GATHER,
GRAD_SYNC, LOSS_SYNC, TP_REDISTRIBUTE) and the parameter it serves, and
returns the new node. `make(target, args, kwargs)` is the pass's node maker:
the ZeRO passes compute each new node's `val` at once (graphs.rewrite.insert_call),
tensor_parallel recomputes every `val` at local shapes after its rewrite.

Costs (ring algorithms, N ranks on the axis, a tensor of B bytes):
  all_gather: each rank sends (N-1)/N * B of the gathered tensor
  reduce_scatter: each rank sends (N-1)/N * B of its input
  all_reduce: each rank sends 2(N-1)/N * B
  chunk (R -> S): local, nothing sent
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from shardfx.graphs import meta
from shardfx.graphs.placement import Partial, Placement, Replicate, Shard

aten = torch.ops.aten
ALL_GATHER = torch.ops.shardfx.all_gather.default
REDUCE_SCATTER = torch.ops.shardfx.reduce_scatter.default
ALL_REDUCE = torch.ops.shardfx.all_reduce.default
CHUNK = torch.ops.shardfx.chunk.default

Make = Callable[..., fx.Node]  # make(target, args, kwargs=None) -> a new node at the insertion point


def _tagged(node: fx.Node, role: str, target: str | None, placement: dict[str, Placement] | None) -> fx.Node:
    node.meta[meta.ROLE] = role
    if target is not None:
        node.meta[meta.TARGET] = target
    if placement is not None:
        node.meta[meta.PLACEMENT] = placement
    return node


def all_gather(
    make: Make, x: fx.Node, axis: str, dim: int, *, role: str, target: str | None = None, placement: bool = False
) -> fx.Node:
    """S(dim) -> R: every rank's shard, concatenated along `dim` (padding rows included)."""
    node = make(ALL_GATHER, (x, axis, dim))
    return _tagged(node, role, target, {axis: Replicate()} if placement else None)


def all_reduce(
    make: Make, x: fx.Node, axis: str, op: str, *, role: str, target: str | None = None, placement: bool = False
) -> fx.Node:
    """P -> R (op "sum"), or the average of replicas' differing values (op "avg": gradients, the loss)."""
    node = make(ALL_REDUCE, (x, axis, op))
    return _tagged(node, role, target, {axis: Replicate()} if placement else None)


def reduce_scatter(
    make: Make, x: fx.Node, axis: str, op: str, dim: int, *, role: str, target: str | None = None
) -> fx.Node:
    """P -> S(dim): reduced, and each rank keeps its 1/N of `dim` (which must divide)."""
    return _tagged(make(REDUCE_SCATTER, (x, axis, op, dim)), role, target, {axis: Shard(dim)})


def chunk(make: Make, x: fx.Node, axis: str, dim: int, blocks: int = 1) -> fx.Node:
    """R -> S(dim, blocks): this rank's slice, locally (of every block when blocks > 1)."""
    return make(CHUNK, (x, axis, dim, blocks))


def unpad(make: Make, x: fx.Node, dim: int, size: int) -> fx.Node:
    """The first `size` rows of `dim`: a gathered padded shard without its padding."""
    return make(aten.slice.Tensor, (x, dim, 0, size))


def pad(make: Make, x: fx.Node, ndim: int, dim: int, padding: int) -> fx.Node:
    """`padding` zero rows after the end of `dim` (dim 0 only here: constant_pad_nd lists dims last first)."""
    assert dim == 0, dim
    return make(aten.constant_pad_nd.default, (x, [0, 0] * (ndim - 1) + [0, padding], 0.0))


def unblock(make: Make, gathered: fx.Node, shape: list[int], dim: int, world: int, blocks: int) -> fx.Node:
    """A gathered S(dim, blocks) tensor is [rank0: b0 b1 .., rank1: b0 b1 ..] along `dim`: reorder it
    to [b0: rank0 rank1 .., b1: ..], the full tensor of `shape`."""
    split = shape[:dim] + [world, blocks, shape[dim] // (world * blocks)] + shape[dim + 1 :]
    v = make(aten.view.default, (gathered, split))
    t = make(aten.transpose.int, (v, dim, dim + 1))
    c = make(aten.clone.default, (t,), {"memory_format": torch.contiguous_format})
    return make(aten.view.default, (c, shape))


def redistribute(
    make: Make, x: fx.Node, have: Any, want: Any, axis: str, world: int, shape: list[int], *, role: str
) -> tuple[fx.Node, str]:
    """What turns placement `have` into `want` on `axis` (`shape`: the global shape of `x`); returns the
    node and the collective it took ("all_reduce", "all_gather", "reduce_scatter" or "" for none or a
    local chunk)."""
    moved = ""
    if isinstance(have, Partial) and isinstance(want, Shard) and want.blocks == 1:
        # sequence parallelism: the sum lands split (ring: (N-1)/N of the tensor, half an all-reduce)
        return reduce_scatter(make, x, axis, "sum", want.dim, role=role), "reduce_scatter"
    if isinstance(have, Partial):
        x = all_reduce(make, x, axis, "sum", role=role)
        have, moved = Replicate(), "all_reduce"
    if isinstance(have, Shard) and have != want:
        x = all_gather(make, x, axis, have.dim, role=role)
        if have.blocks > 1:
            x = unblock(make, x, shape, have.dim, world, have.blocks)
        have, moved = Replicate(), moved or "all_gather"
    if isinstance(want, Shard) and have == Replicate():
        x = chunk(make, x, axis, want.dim, want.blocks)
    return x, moved
