"""Shared steps of the ZeRO passes: shard a parameter placeholder, gather it back, reduce-scatter its gradient.

Every sharded parameter is split along dim 0 over the data-parallel ranks,
padded so every rank holds ceil(d0 / N) rows (ShardSpec). 0-dim parameters
stay replicated and their gradients are all-reduced as in data_parallel.

Costs (ring algorithms, N ranks, parameter of B bytes):
  all_gather of the shard: each rank sends (N-1)/N * B
  reduce_scatter of the padded gradient: each rank sends (N-1)/N * B
"""

from __future__ import annotations

import torch
import torch.fx as fx

from shardfx.graphs import collectives, meta
from shardfx.graphs.analysis import ALIAS_OPS
from shardfx.graphs.placement import Shard, ShardSpec
from shardfx.graphs.program import DistProgram
from shardfx.graphs.rewrite import insert_call
from shardfx.graphs.signature import GRAD, LOSS, PARAM
from shardfx.passes import redistribute

aten = torch.ops.aten

# Ops that only re-view (or re-cast) their first argument: a parameter seen through
# them is still "the parameter" and is re-derived from a fresh gather in backward.
VIEW_OPS = (ALIAS_OPS - {collectives.WAIT}) | {aten._to_copy.default}


def sharded_params(program: DistProgram, persistence_threshold: int = 0) -> list[tuple[int, fx.Node]]:
    """(signature index, placeholder) of every parameter that can be dim-0 sharded (dim >= 1) and
    holds more than `persistence_threshold` elements (ZeRO-3's: ones with at most that many stay
    whole, as DeepSpeed's stage3_param_persistence_threshold)."""
    out = []
    for i, (spec, node) in enumerate(zip(program.signature.inputs, program.placeholders())):
        val = node.meta["val"]
        if spec.role == PARAM and val.dim() >= 1 and val.numel() > persistence_threshold:
            out.append((i, node))
    return out


def shard_placeholder(program: DistProgram, node: fx.Node, name: str, axis: str) -> ShardSpec:
    """Make `node` hold this rank's shard: record the ShardSpec and give the placeholder the shard's val."""
    full = node.meta["val"]
    spec = ShardSpec(axis=axis, dim=0, world=program.mesh.size(axis), full_shape=tuple(full.shape))
    with program.fake_mode:
        node.meta["val"] = torch.empty(spec.shard_shape, dtype=full.dtype, device=full.device)
    node.meta.setdefault(meta.PLACEMENT, {})[axis] = Shard(0)
    program.shard_specs[name] = spec
    return spec


def _maker(program: DistProgram, provenance: fx.Node, origin: str) -> redistribute.Make:
    """New nodes with their `val` computed at once, serving `provenance` (phase, module, source line)."""
    return lambda target, args, kwargs=None: insert_call(
        program, target, args, kwargs, provenance=provenance, origin=origin
    )


def gather(
    program: DistProgram, shard: fx.Node, spec: ShardSpec, name: str, provenance: fx.Node, origin: str
) -> fx.Node:
    """all_gather the shard and drop the padding rows: the full parameter (at the insertion point)."""
    make = _maker(program, provenance, origin)
    full = redistribute.all_gather(make, shard, spec.axis, 0, role=meta.PARAM_GATHER, target=name, placement=True)
    if spec.padding:  # (padded_d0, ...) -> (d0, ...)
        full = redistribute.unpad(make, full, 0, spec.full_shape[0])
    return full


def reduce_scatter_grad(program: DistProgram, grad: fx.Node, spec: ShardSpec, name: str, origin: str) -> fx.Node:
    """Pad the full gradient to N * shard rows and reduce-scatter it (average): this rank's gradient shard."""
    make = _maker(program, grad, origin)
    value = grad
    if spec.padding:  # (d0, ...) -> (padded_d0, ...)
        value = redistribute.pad(make, value, len(spec.full_shape), 0, spec.padding)
    return redistribute.reduce_scatter(make, value, spec.axis, "avg", 0, role=meta.GRAD_SYNC, target=name)


def all_reduce_grad(program: DistProgram, grad: fx.Node, axis: str, name: str, origin: str) -> fx.Node:
    make = _maker(program, grad, origin)
    return redistribute.all_reduce(make, grad, axis, "avg", role=meta.GRAD_SYNC, target=name, placement=True)


def sync_loss(program: DistProgram, axis: str, origin: str) -> None:
    """Return the global mean loss (one scalar all-reduce at the end of the step)."""
    outputs = program.outputs()
    i = next((i for i, s in enumerate(program.signature.outputs) if s.role == LOSS), None)
    if i is None:  # a pipeline stage before the last computes no loss
        return
    with program.graph.inserting_before(program.output_node()):
        make = _maker(program, outputs[i], origin)
        mean = redistribute.all_reduce(make, outputs[i], axis, "avg", role=meta.LOSS_SYNC)
    outputs[i] = mean
    program.set_outputs(outputs)


def sync_grads(program: DistProgram, axis: str, origin: str, *, at_end: bool) -> tuple[int, int]:
    """Reduce every gradient: reduce-scatter sharded ones, all-reduce replicated ones.

    at_end=False: right after the node that produces the gradient (ZeRO-2/3);
    at_end=True: all together after the whole backward (ZeRO-1).
    Returns (reduce_scatters, all_reduces).
    """
    outputs = program.outputs()
    n_rs = n_ar = 0
    for i, spec in enumerate(program.signature.outputs):
        if spec.role != GRAD:
            continue
        grad = outputs[i]
        where = (
            program.graph.inserting_before(program.output_node())
            if at_end
            else program.graph.inserting_before(grad.next)
        )
        with where:
            shard_spec = program.shard_specs.get(spec.target)
            if shard_spec is not None:
                outputs[i] = reduce_scatter_grad(program, grad, shard_spec, spec.target, origin)
                n_rs += 1
            else:
                outputs[i] = all_reduce_grad(program, grad, axis, spec.target, origin)
                n_ar += 1
    program.set_outputs(outputs)
    return n_rs, n_ar


def param_name(program: DistProgram, index: int) -> str:
    return program.signature.inputs[index].name


def gather_all_at_top(program: DistProgram, axis: str, origin: str) -> int:
    """Shard every parameter and all-gather the full replicas right after the placeholders (ZeRO-1/2)."""
    first_op = next(n for n in program.graph.nodes if n.op != "placeholder")
    gathered = 0
    for index, node in sharded_params(program):
        name = param_name(program, index)
        users = list(node.users)
        spec = shard_placeholder(program, node, name, axis)
        if not users:  # a parameter the step never reads: kept as a shard, never gathered
            continue
        with program.graph.inserting_before(first_op):
            full = gather(program, node, spec, name, provenance=node, origin=origin)
        for user in users:
            user.replace_input_with(node, full)
        gathered += 1
    return gathered
