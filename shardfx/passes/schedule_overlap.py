"""schedule_overlap: turn collectives into start/wait pairs and place them so transfers hide behind compute.

- parameter all-gathers (prefetch): the start of the k-th gather is issued right
  after the wait of the (k - depth)-th (after its copy-out, for a bucket), so while one block computes, the next
  `depth` blocks' parameters are on their way; its wait sits right before the
  first use. The first `depth` gathers start at the top of the step, in their order.
  With `peak_limit` (bytes), a gather is issued deeper than 1 only where the step's
  live memory leaves room for its buffer under the limit (the tuner passes the peak of
  the depth-1 schedule: the deep prefetch of the forward's first blocks and the
  backward's last ones, where activations are few, without the peak of a deeper
  prefetch at the forward-to-backward turn, where they are most); and a gradient
  reduction is waited for that late only where its input fits there too.
- gradient reductions: the start stays where the gradient (bucket) is complete
  (an all-reduce of a buffer nothing else reads runs in that buffer: no copy);
  the k-th one's wait sits right before the (k + depth)-th reduction starts (at
  most `depth` reductions in flight, so reduction buffers do not pile up) and
  the last `depth` ones' before the end.
- everything else (the loss mean, batch-norm statistics) stays synchronous.

The order in which collectives start is unchanged and identical on every rank
(one SPMD graph); gathers' starts move earlier and waits move, never the
arithmetic, so results are bit-identical. With per-reduction depths a later
reduction may be waited for before an earlier one (harmless: each wait reads
only its own buffer).
Needs: a sharding pass (and bucket_collectives if used). Provides: *_start / wait nodes.
"""

from __future__ import annotations

import operator

import torch.fx as fx
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef

from shardfx.graphs import collectives, meta
from shardfx.graphs.analysis import memory_timeline, storage_owner, tensor_bytes
from shardfx.graphs.program import DistProgram
from shardfx.graphs.rewrite import insert_call
from shardfx.passes.bucket_collectives import ORIGIN as BUCKETING  # the origin of a bucket's copy-out
from shardfx.passes.manager import PassContext, PassResult

ORIGIN = "schedule_overlap"


def schedule_overlap(
    program: DistProgram, ctx: PassContext, *, depth: int = 1, peak_limit: int | None = None
) -> PassResult:
    graph = program.graph
    gathers: list[tuple[fx.Node, fx.Node]] = []
    reductions: list[tuple[fx.Node, fx.Node]] = []
    for node in list(graph.nodes):
        if not collectives.is_collective(node) or collectives.is_start(node):
            continue
        role = node.meta.get(meta.ROLE)
        if role not in (meta.PARAM_GATHER, meta.GRAD_SYNC):
            continue
        start, wait = _split(program, node)
        (gathers if role == meta.PARAM_GATHER else reductions).append((start, wait))
    bounded = peak_limit is not None and depth > 1
    first = 1 if bounded else depth  # a bounded schedule starts from depth 1 and deepens where there is room
    _prefetch(program, gathers, [first] * len(gathers))
    _drain(program, reductions, [first] * len(reductions))
    stats: dict[str, object] = {"prefetched_gathers": len(gathers), "async_reductions": len(reductions)}
    if bounded:
        gather_depths, reduce_depths = _deepen(program, gathers, reductions, depth, peak_limit)
        _prefetch(program, gathers, gather_depths)
        _drain(program, reductions, reduce_depths)
        stats |= {"gather_depths": gather_depths, "reduction_depths": reduce_depths}
    return PassResult(program, stats)


def _drain(program: DistProgram, reductions: list[tuple[fx.Node, fx.Node]], depths: list[int]) -> None:
    """The k-th reduction's wait right before the (k + depths[k])-th reduction starts (the step's end
    for the last ones): at most depths[k] in flight beside it, so reduction buffers do not pile up."""
    for k, (_, wait) in enumerate(reductions):
        if k + depths[k] >= len(reductions):
            _delay(program, wait, program.output_node())
            continue
        next_start = reductions[k + depths[k]][0]
        if _position(program)(wait) > _position(program)(next_start):
            next_start.prepend(wait)  # earlier: its start precedes next_start and its readers come later
        else:
            _delay(program, wait, next_start)


def _anchor(program: DistProgram, gathers: list[tuple[fx.Node, fx.Node]], k: int, depth: int) -> fx.Node:
    """Where the k-th gather starts at `depth`: after the copy-out of the wait `depth` gathers earlier
    (the step's inputs for the first ones)."""
    return program.placeholders()[-1] if k < depth else _copied_out(gathers[k - depth][1])


def _prefetch(program: DistProgram, gathers: list[tuple[fx.Node, fx.Node]], depths: list[int]) -> None:
    """Issue the k-th gather's start `depths[k]` gathers ahead, never before the (k-1)-th's start: the
    gathers start in their order (every rank issues one order; the first needed is sent first)."""
    key = _position(program)
    for k, (start, _) in enumerate(gathers):
        after = _anchor(program, gathers, k, depths[k])
        if k > 0 and key(gathers[k - 1][0]) > key(after):
            after = gathers[k - 1][0]
        _hoist_after(program, start, after)


def _deepen(
    program: DistProgram,
    gathers: list[tuple[fx.Node, fx.Node]],
    reductions: list[tuple[fx.Node, fx.Node]],
    depth: int,
    limit: int,
) -> tuple[list[int], list[int]]:
    """Per gather and per reduction of the depth-1 schedule, the most in flight up to `depth` at which
    what it holds the longer fits beside what is live under `limit` bytes (what was deepened before
    it counted): a gather's buffer from its earlier start, a reduction's input to its later wait."""
    nodes = list(program.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    live = list(memory_timeline(program).live)

    def fits(begin: int, end: int, extra: int) -> bool:
        if max(live[begin:end], default=0) + extra > limit:
            return False
        for i in range(begin, end):
            live[i] += extra
        return True

    gather_depths = [1] * len(gathers)
    issued, anchored = -1, -1  # where the previous gather now starts, and the node it starts after
    for k, (start, _) in enumerate(gathers):
        at, anchor = index[start], index[_anchor(program, gathers, k, 1)]
        # the first k + 1 depths cover every placement of the k-th gather: any deeper starts it at the top too
        for d in range(min(depth, k + 1), 1, -1):
            after = index[_anchor(program, gathers, k, d)]
            if after < anchored:  # it would start before the previous gather: that depth is not possible
                continue
            after = max(after, issued)  # right after the previous start, if that has the same anchor
            held = tensor_bytes(start.meta["val"]) + _moved_bytes(start, after, index)
            if after < at and fits(after + 1, at, held):
                gather_depths[k], at, anchor = d, after, index[_anchor(program, gathers, k, d)]
                break
        issued, anchored = at, anchor
    reduce_depths = [1] * len(reductions)
    for k, (start, wait) in enumerate(reductions):
        held = sum(tensor_bytes(a.meta.get("val")) for a in start.all_input_nodes)
        # depths past the last reductions all wait at the step's end: len - k of them cover every placement
        for d in range(min(depth, len(reductions) - k), 1, -1):
            until = index[reductions[k + d][0]] if k + d < len(reductions) else len(nodes) - 1
            if until > index[wait] and fits(index[wait], until, held):
                reduce_depths[k] = d
                break
    return gather_depths, reduce_depths


def _moved_bytes(start: fx.Node, after: int, index: dict[fx.Node, int]) -> int:
    """Bytes of the inputs a start hoisted to just after node `after` takes along (_hoist_after): a
    bucket's flat cat of shards, a bf16 copy; they then live from there to the start."""
    moved, todo = set(), [a for a in start.all_input_nodes if index[a] > after]
    while todo:
        node = todo.pop()
        if node not in moved:
            moved.add(node)
            todo.extend(a for a in node.all_input_nodes if index[a] > after)
    return sum(tensor_bytes(n.meta.get("val")) for n in moved)


def _split(program: DistProgram, node: fx.Node) -> tuple[fx.Node, fx.Node]:
    """Replace a sync collective by start (at its place) + wait (right before its first user)."""
    kind = collectives.kind(node)
    target = collectives.START_OPS[kind]
    if kind == "all_reduce" and _donated(program, node):
        target = collectives.ALL_REDUCE_START_
    with program.graph.inserting_before(node):
        # an async collective's buffer is shaped as the sync one's result, and its wait returns it
        val = node.meta["val"]
        start = insert_call(program, target, node.args, provenance=node, origin=ORIGIN, val=val)
    for key in (meta.ROLE, meta.TARGET, meta.BUCKET, meta.PLACEMENT):
        if key in node.meta:
            start.meta[key] = node.meta[key]
    first_user = min(node.users, key=_position(program)) if node.users else program.output_node()
    with program.graph.inserting_before(first_user):
        wait = insert_call(program, collectives.WAIT, (start,), provenance=node, origin=ORIGIN, val=val)
    wait.meta[meta.PHASE] = first_user.meta.get(meta.PHASE, node.meta.get(meta.PHASE))
    node.replace_all_uses_with(wait)
    program.graph.erase_node(node)
    return start, wait


def _donated(program: DistProgram, node: fx.Node) -> bool:
    """Whether the all-reduce may run in its input's storage: the input is an allocation of its own
    (a bucket's cat, a gradient's matmul or layer norm backward; no view, no input of the step, no
    other collective's buffer), contiguous, and nothing else reads it."""
    x = node.args[0]
    if not isinstance(x, fx.Node) or x.op != "call_function" or len(x.users) != 1:
        return False
    val = x.meta.get("val")
    if not isinstance(val, Tensor) or not val.is_contiguous():
        return False
    if storage_owner(x) is not x or x in program.outputs():
        return False
    maker = x.args[0] if x.target is operator.getitem else x
    # the op's own schema says whether it returns a view (ops.ALIAS_OPS lists the common ones only),
    # and the traced values whether it shares an input's storage (unsafe_split's schema says nothing)
    schema = getattr(maker.target, "_schema", None)
    if schema is None or any(r.alias_info is not None for r in schema.returns):
        return False
    mine = StorageWeakRef(val.untyped_storage())
    for arg in maker.all_input_nodes:
        other = arg.meta.get("val")
        if isinstance(other, Tensor) and StorageWeakRef(other.untyped_storage()) == mine:
            return False
    # one element of a multi-output op (a layer norm's weight gradient): no other getitem picks it
    return x.target is not operator.getitem or sum(u.args[1] == x.args[1] for u in x.args[0].users) == 1


def _copied_out(wait: fx.Node) -> fx.Node:
    """The last node of the copy-out right after a gathered bucket's wait (bucket_collectives' slices,
    views and copies of each member out of the flat buffer), or the wait itself. The next gather
    starts after it: its buffer is not allocated while this bucket exists twice (flat and copied),
    and a copy-out is no compute to hide a transfer behind."""
    chain, node = {wait}, wait.next
    while node.meta.get(meta.ORIGIN) == BUCKETING and any(arg in chain for arg in node.all_input_nodes):
        chain.add(node)
        node = node.next
    return node.prev


def _position(program: DistProgram):  # noqa: ANN202 - a key function
    """Graph order as a key. fx keeps every node's `_sort_key` in list order as nodes move (torch
    2.5 and later), so no renumbering per move: that made this pass quadratic."""
    return _sort_key


def _sort_key(node: fx.Node) -> tuple[int, ...]:
    return node._sort_key


def _delay(program: DistProgram, node: fx.Node, anchor: fx.Node) -> None:
    """Move `node` to just before a later `anchor`, and its readers (transitively) after it."""
    key = _position(program)
    if key(anchor) <= key(node):
        return
    anchor.prepend(node)
    key = _position(program)
    pending = [u for u in node.users if key(u) < key(node)]
    last = node
    while pending:
        pending.sort(key=key)
        user = pending.pop(0)
        if key(user) > key(last):
            continue
        last.append(user)
        last = user
        key = _position(program)
        pending.extend(u for u in user.users if key(u) < key(user) and u not in pending)


def _hoist_after(program: DistProgram, node: fx.Node, after: fx.Node) -> None:
    """Move `node` up to just after `after` (if it is later), first moving the inputs it needs that are later too."""
    key = _position(program)
    if key(node) <= key(after):
        return
    for arg in node.all_input_nodes:
        if key(arg) > key(after):
            _hoist_after(program, arg, after)
            key = _position(program)
    last_input = max([after, *node.all_input_nodes], key=key)
    last_input.append(node)
