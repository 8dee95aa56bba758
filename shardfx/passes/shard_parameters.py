"""ZeRO-3: keep only a 1/N shard of each parameter on every rank.

For every parameter with dim >= 1 and more than `persistence_threshold` elements (0-dim and
smaller ones stay replicated, their gradients all-reduced: DeepSpeed's
stage3_param_persistence_threshold, which saves a gather per use of a bias or a norm weight):
- the placeholder becomes this rank's dim-0 shard (ShardSpec, padded);
- forward: all-gather right before the first forward use; the gathered copy is
  freed after its last forward use (the graph holds no later reference);
- backward (reshard_after_forward=True): all-gather again right before the first
  backward use, and re-derive from it the views of the parameter the backward
  reads (e.g. the transposed weight of a Linear), so nothing from the forward
  gather stays alive across the step;
- reshard_after_forward=False: the backward reuses the forward copy (2/3 of the
  traffic, ZeRO-2-like memory);
- its gradient is reduce-scattered (averaged) right where it is produced.
Frozen parameters are gathered but never reduced. A tied parameter is one
placeholder: gathered once for its forward uses and once for its backward
uses, reduced once.

Traffic per step: 3x the parameter bytes (2x without resharding).

Needs: capture phases. Provides: ShardSpec per parameter, meta[PLACEMENT], gathers, reduce-scatters.
"""

from __future__ import annotations

import torch.fx as fx

from shardfx.graphs import meta
from shardfx.graphs.program import DistProgram
from shardfx.passes.manager import PassContext, PassResult
from shardfx.passes.sharding import (
    VIEW_OPS,
    gather,
    param_name,
    shard_placeholder,
    sharded_params,
    sync_grads,
    sync_loss,
)

ORIGIN = "shard_parameters"


def shard_parameters(
    program: DistProgram,
    ctx: PassContext,
    *,
    axis: str = "dp",
    reshard_after_forward: bool = True,
    persistence_threshold: int = 0,
) -> PassResult:
    order = {n: i for i, n in enumerate(program.graph.nodes)}
    gathers = 0
    for index, node in sharded_params(program, persistence_threshold):
        name = param_name(program, index)
        views = _param_views(node, order)  # node and the forward nodes that only re-view it
        forward_users = [u for u in node.users if meta.phase(u) == meta.FORWARD]
        backward_reads = [
            (user, member)
            for member in views
            for user in member.users
            if meta.phase(user) == meta.BACKWARD and user not in views
        ]
        spec = shard_placeholder(program, node, name, axis)
        # Backward first, while the views still hang off the placeholder.
        if backward_reads and (reshard_after_forward or not forward_users):
            first = min((u for u, _ in backward_reads), key=order.__getitem__)
            with program.graph.inserting_before(first):
                full = gather(program, node, spec, name, provenance=first, origin=ORIGIN)
                copies = _replay_views(program, node, full, views, {m for _, m in backward_reads}, first)
            for user, member in backward_reads:
                user.replace_input_with(member, copies[member])
            gathers += 1
        if forward_users:
            first = min(forward_users, key=order.__getitem__)
            with program.graph.inserting_before(first):
                full = gather(program, node, spec, name, provenance=first, origin=ORIGIN)
            for user in forward_users:
                user.replace_input_with(node, full)
            if not reshard_after_forward:  # the backward reads the forward copy
                for user, member in backward_reads:
                    if member is node:
                        user.replace_input_with(node, full)
            gathers += 1
    n_rs, n_ar = sync_grads(program, axis, ORIGIN, at_end=False)
    sync_loss(program, axis, ORIGIN)
    return PassResult(program, {"all_gathers": gathers, "reduce_scatters": n_rs, "all_reduces": n_ar})


def _param_views(param: fx.Node, order: dict[fx.Node, int]) -> list[fx.Node]:
    """The parameter and every forward node reached from it through view-like ops only, in graph order."""
    members = {param}
    frontier = [param]
    while frontier:  # walks only the parameter's users: linear in the graph, not params x nodes
        node = frontier.pop()
        for user in node.users:
            if (
                user not in members
                and user.op == "call_function"
                and user.target in VIEW_OPS
                and meta.phase(user) == meta.FORWARD
                and user.args[0] is node
            ):
                members.add(user)
                frontier.append(user)
    return sorted(members, key=order.__getitem__)


def _replay_views(
    program: DistProgram,
    param: fx.Node,
    full: fx.Node,
    views: list[fx.Node],
    needed: set[fx.Node],
    provenance: fx.Node,
) -> dict[fx.Node, fx.Node]:
    """Re-derive, from the backward gather `full`, the views of the parameter the backward reads."""
    wanted: set[fx.Node] = set()
    for member in needed:
        while member is not param and member not in wanted:  # walk the view chain back to the parameter
            wanted.add(member)
            member = member.args[0]
    copies: dict[fx.Node, fx.Node] = {param: full}
    for member in views:
        if member in wanted:
            copy = program.graph.node_copy(member, lambda n: copies.get(n, n))
            copy.meta = dict(member.meta)
            meta.copy_provenance(provenance, copy, ORIGIN)
            copies[member] = copy
    return copies
