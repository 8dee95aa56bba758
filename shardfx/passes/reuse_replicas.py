"""reuse_replicas: ZeRO-1/2 gather the parameters once per optimizer step, not once per micro-batch.

ZeRO-1/2 all-gather every parameter shard into a full replica at the top of the
step. Under gradient accumulation the parameters do not change between the
micro-batches of one optimizer step, so only the first needs the gathers:

  "gather"  (the first micro-batch) also returns each gathered replica (output
            role REPLICA), which the runtime keeps until the optimizer steps;
  "reuse"   (the others) takes the kept replicas as inputs (input role REPLICA)
            in place of the all-gathers: no parameter traffic at all.

Replicas are kept in the dtype they were gathered in (bf16 under mixed precision).
Runs after the sharding pass and mixed precision, before bucketing and overlap.
Needs: param_gather nodes (shard_optimizer_state / shard_gradients).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from shardfx.graphs import meta
from shardfx.graphs.program import DistProgram
from shardfx.graphs.rewrite import add_input
from shardfx.graphs.signature import REPLICA, OutputSpec
from shardfx.passes.manager import PassContext, PassResult

ORIGIN = "reuse_replicas"
VARIANTS = ("gather", "reuse")
SLICE = torch.ops.aten.slice.Tensor


def reuse_replicas(program: DistProgram, ctx: PassContext, *, variant: str) -> PassResult:
    if variant not in VARIANTS:
        raise ValueError(f"reuse_replicas variant must be one of {list(VARIANTS)}; got {variant!r}")
    graph = program.graph
    gathers = [n for n in graph.nodes if meta.role(n) == meta.PARAM_GATHER]
    replicas = [_replica(g) for g in gathers]
    if variant == "gather":
        outputs = program.outputs()
        for gather, replica in zip(gathers, replicas):
            outputs.append(replica)
            program.signature.outputs.append(OutputSpec(REPLICA, gather.meta[meta.TARGET]))
        program.set_outputs(outputs)
        return PassResult(program, {"replicas_returned": len(gathers)})
    for gather, replica in zip(gathers, replicas):
        name = gather.meta[meta.TARGET]
        placeholder = "replica_" + name.replace(".", "_")
        kept = add_input(program, placeholder, replica.meta["val"], REPLICA, name, provenance=gather, origin=ORIGIN)
        replica.replace_all_uses_with(kept)
        _erase_chain(graph, replica)
    return PassResult(program, {"gathers_removed": len(gathers)})


def _replica(gather: fx.Node) -> fx.Node:
    """The node every user reads: the gather, or the slice that drops its padding rows."""
    users = list(gather.users)
    if len(users) == 1 and users[0].target is SLICE:
        return users[0]
    return gather


def _erase_chain(graph: fx.Graph, node: fx.Node) -> None:
    """Erase `node` and, walking up its first argument, every node left without users (gather, cast)."""
    while node.op == "call_function" and not node.users:
        source = node.args[0]
        graph.erase_node(node)
        if not isinstance(source, fx.Node):
            return
        node = source
