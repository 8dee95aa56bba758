"""clip_gradients: scale every gradient so their global norm is at most `max_norm`.

Runs after the gradients are reduced, so it sees each rank's part of the
final gradient: for sharded gradients the squared norms of the local shards
are all-reduced (sum) across the data-parallel axis (padding rows are zero and
add nothing); replicated gradients count once. The coefficient is torch's:
min(1, max_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_.

Needs: a sharding pass (reduced gradients, shard_specs). Provides: optimizer-phase nodes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from shardfx.graphs import meta
from shardfx.graphs.program import DistProgram
from shardfx.graphs.rewrite import inline
from shardfx.graphs.signature import GRAD
from shardfx.passes.manager import PassContext, PassResult


def clip_gradients(program: DistProgram, ctx: PassContext, *, max_norm: float, axis: str = "dp") -> PassResult:
    outputs = program.outputs()
    indices = [i for i, s in enumerate(program.signature.outputs) if s.role == GRAD]
    if not indices:
        return PassResult(program, {"clipped": 0})
    sharded = [program.signature.outputs[i].target in program.shard_specs for i in indices]

    def clip(*grads: Tensor) -> tuple[Tensor, ...]:
        local = [g.float().pow(2).sum() for g, s in zip(grads, sharded) if s]
        total = torch.zeros((), dtype=torch.float32)
        if local:
            total = torch.ops.shardfx.all_reduce(torch.stack(local).sum(), axis, "sum")
        for g, s in zip(grads, sharded):
            if not s:
                total = total + g.float().pow(2).sum()
        coef = torch.clamp(max_norm / (total.sqrt() + 1e-6), max=1.0)
        return tuple(g * coef.to(g.dtype) for g in grads)

    before = set(program.graph.nodes)
    with program.graph.inserting_before(program.output_node()):
        clipped = inline(
            program, clip, [outputs[i] for i in indices], provenance=outputs[indices[-1]], origin="clip_gradients"
        )
    for node in program.graph.nodes:
        if node not in before:
            node.meta[meta.PHASE] = meta.OPTIMIZER
    for i, new in zip(indices, clipped):
        outputs[i] = new
    program.set_outputs(outputs)
    return PassResult(program, {"clipped": len(indices)})
