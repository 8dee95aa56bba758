"""bucket_collectives: merge collectives into flat ones, up to a size cap (gathers and scatters per block).

Small collectives pay a fixed latency each (alpha in the alpha-beta model);
one flat collective pays it once. Members are the parameter all-gathers and
gradient reduce-scatters / all-reduces of the same kind, mesh axis, dtype and
reduce op, in graph order, while the bucket stays under `bucket_bytes`.
Gathers and reduce-scatters also share a block (module path prefix such as
`blocks.3`): a block's parameters are gathered together and freed together, and
a sharded gradient's full copy dies with its block's reduce-scatter (a bucket
across blocks keeps every member's full gradient alive until the last one is
produced: under ZeRO-3 with a 16 MiB cap, all of the GPT's gradients at the end
of the backward, 39.0 MiB at 4 ranks against FSDP2's 38.1, which reduce-scatters
per module). All-reduces span blocks, as DDP's buckets do: the reduced gradient
lives to the end of the step anyway, and a bucket per block would pay the latency
once per block however large the cap (on gloo at 4 ranks, 8 per-block
all-reduces cost ZeRO-0 about 10% of its step against 2 buckets).

  all-gather bucket: placed where its first member was (shards are inputs, always ready):
      flat = cat(shard_i.flatten())            # (S,)
      out = all_gather(flat).view(N, S)        # rank r's flat shards in row r
      full_i = out[:, off_i:off_i+len_i].reshape(padded full shape)   # one copy-out per member
  reduce-scatter bucket: placed where its last member was (every gradient is ready):
      flat = cat(g_i.reshape(N, -1), dim=1).flatten()   # rank r's part of every gradient together
      shard_i = reduce_scatter(flat)[off_i:off_i+len_i].view(shard shape)
  all-reduce bucket: flat = cat(g_i.flatten()); g_i = all_reduce(flat)[off_i:...].view(shape)

Every element is reduced with the same operands in the same order, so parity is exact.
Needs: a sharding pass. Provides: meta[BUCKET] on the merged collectives.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch import Tensor

from shardfx.graphs import collectives, meta
from shardfx.graphs.program import DistProgram
from shardfx.graphs.rewrite import inline, restore_order
from shardfx.passes.manager import PassContext, PassResult

ORIGIN = "bucket_collectives"
ROLES = (meta.PARAM_GATHER, meta.GRAD_SYNC)
PER_BLOCK = ("all_gather", "reduce_scatter")  # kinds whose buckets stay within a block


def block_of(module: str) -> str:
    """The block a module path belongs to: 'blocks.3' for 'blocks.3.attn.qkv', 'wte' for 'wte'."""
    parts = module.split(".") if module else []
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0] if parts else ""


def _key(node: fx.Node) -> tuple:
    val = node.args[0].meta["val"]
    return (collectives.kind(node), node.args[1:], val.dtype, node.meta.get(meta.PHASE))


def _candidates(program: DistProgram) -> list[fx.Node]:
    return [
        n
        for n in program.graph.nodes
        if collectives.is_collective(n)
        and not collectives.is_start(n)
        and n.meta.get(meta.ROLE) in ROLES
        and (collectives.kind(n) == "all_reduce" or n.args[-1] == 0)  # dim-0 gathers and scatters
    ]


def buckets(program: DistProgram, bucket_bytes: int) -> list[list[fx.Node]]:
    """Group collectives in graph order: same kind/axis/dtype/phase (PER_BLOCK kinds: same block), under the cap."""
    groups: list[list[fx.Node]] = []
    open_by_key: dict[tuple, list[fx.Node]] = {}
    sizes: dict[int, int] = {}
    for node in _candidates(program):
        key = _key(node)
        if collectives.kind(node) in PER_BLOCK:
            key = (*key, block_of(node.meta.get(meta.MODULE, "")))
        nbytes = collectives.nbytes(
            node.meta["val"] if collectives.kind(node) == "all_gather" else node.args[0].meta["val"]
        )
        group = open_by_key.get(key)
        if group is None or sizes[id(group)] + nbytes > bucket_bytes:
            group = []
            groups.append(group)
            open_by_key[key] = group
            sizes[id(group)] = 0
        group.append(node)
        sizes[id(group)] += nbytes
    return groups


def bucket_collectives(program: DistProgram, ctx: PassContext, *, bucket_bytes: int) -> PassResult:
    merged = 0
    made = 0
    for index, group in enumerate(buckets(program, bucket_bytes)):
        if len(group) < 2:
            continue
        kind = collectives.kind(group[0])
        if kind == "all_gather":
            _merge_gathers(program, group, index)
        elif kind == "reduce_scatter":
            _merge_scatters(program, group, index)
        else:
            _merge_all_reduces(program, group, index)
        merged += len(group)
        made += 1
    # a reduction bucket sits where its last member was: the earlier members' readers (a cast of
    # a gradient reduced in bf16 back to fp32) move after it
    moved = restore_order(program.graph)
    return PassResult(program, {"collectives_merged": merged, "buckets": made, "readers_moved": moved})


def _finish(program: DistProgram, group: list[fx.Node], outs: list, index: int) -> None:
    for node, out in zip(group, outs):
        node.replace_all_uses_with(out)
        if meta.PLACEMENT in node.meta:
            out.meta[meta.PLACEMENT] = node.meta[meta.PLACEMENT]
        program.graph.erase_node(node)
    merged = _collective_above(outs[0])
    merged.meta[meta.BUCKET] = index
    merged.meta[meta.ROLE] = group[0].meta.get(meta.ROLE)
    merged.meta[meta.TARGET] = ",".join(str(g.meta.get(meta.TARGET)) for g in group)


def _collective_above(node: fx.Node) -> fx.Node:
    """The bucket's collective: the nearest collective among a bucket output's inputs."""
    frontier = [node]
    while frontier:
        n = frontier.pop()
        if collectives.is_collective(n):
            return n
        frontier.extend(n.all_input_nodes)
    raise AssertionError(f"no collective above {node.name}")


def _hoist_inputs(program: DistProgram, node: fx.Node, before: fx.Node) -> None:
    """Move the (cheap, input-only) producers of `node`'s inputs above `before` when they come after it
    (fx keeps `_sort_key` in graph order as nodes move)."""
    for arg in node.all_input_nodes:
        if arg._sort_key > before._sort_key:
            _hoist_inputs(program, arg, before)
            before.prepend(arg)


def _unflatten(flat: Tensor, shapes: list[tuple[int, ...]]) -> tuple[Tensor, ...]:
    """Consecutive views of a flat buffer, one per shape (no copies)."""
    parts, offset = [], 0
    for shape in shapes:
        length = math.prod(shape)
        parts.append(flat[offset : offset + length].view(shape))
        offset += length
    return tuple(parts)


def _merge_gathers(program: DistProgram, group: list[fx.Node], index: int) -> None:
    axis = group[0].args[1]
    n = program.mesh.size(axis)
    shapes = [tuple(g.meta["val"].shape) for g in group]
    first = group[0]
    for g in group[1:]:
        _hoist_inputs(program, g, first)

    def gather_bucket(*shards: Tensor) -> tuple[Tensor, ...]:
        lengths = [s.numel() for s in shards]
        flat = torch.cat([s.reshape(-1) for s in shards])  # (S,)
        out = torch.ops.shardfx.all_gather(flat, axis, 0).view(n, -1)  # (N, S)
        fulls, offset = [], 0
        for length, shape in zip(lengths, shapes):
            fulls.append(out[:, offset : offset + length].reshape(shape))  # (N * rows, ...)
            offset += length
        return tuple(fulls)

    with program.graph.inserting_before(first):
        key = ("gather_bucket", axis, n, tuple(shapes))
        outs = inline(program, gather_bucket, [g.args[0] for g in group], provenance=first, origin=ORIGIN, key=key)
    _finish(program, group, outs, index)


def _merge_scatters(program: DistProgram, group: list[fx.Node], index: int) -> None:
    axis, op = group[0].args[1], group[0].args[2]
    n = program.mesh.size(axis)
    shapes = [tuple(g.meta["val"].shape) for g in group]
    last = group[-1]

    def scatter_bucket(*grads: Tensor) -> tuple[Tensor, ...]:
        flat = torch.cat([g.reshape(n, -1) for g in grads], dim=1).reshape(-1)  # (N * S,)
        return _unflatten(torch.ops.shardfx.reduce_scatter(flat, axis, op, 0), shapes)  # (S,) -> shards

    with program.graph.inserting_before(last):
        key = ("scatter_bucket", axis, op, n, tuple(shapes))
        outs = inline(program, scatter_bucket, [g.args[0] for g in group], provenance=last, origin=ORIGIN, key=key)
    _finish(program, group, outs, index)


def _merge_all_reduces(program: DistProgram, group: list[fx.Node], index: int) -> None:
    axis, op = group[0].args[1], group[0].args[2]
    shapes = [tuple(g.meta["val"].shape) for g in group]
    last = group[-1]

    def reduce_bucket(*grads: Tensor) -> tuple[Tensor, ...]:
        return _unflatten(torch.ops.shardfx.all_reduce(torch.cat([g.reshape(-1) for g in grads]), axis, op), shapes)

    with program.graph.inserting_before(last):
        key = ("reduce_bucket", axis, op, tuple(shapes))
        outs = inline(program, reduce_bucket, [g.args[0] for g in group], provenance=last, origin=ORIGIN, key=key)
    _finish(program, group, outs, index)
