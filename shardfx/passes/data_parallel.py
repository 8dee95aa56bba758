"""data_parallel (ZeRO stage 0, DDP semantics).

Every rank runs the step on its dim-0 slice of the global batch. Each
gradient is averaged across the data-parallel ranks by a `shardfx.all_reduce`
inserted right after the node that produces it, so the reduction of late
layers can start while earlier layers still compute their backward. The loss
a rank returns is the global mean (one scalar all-reduce at the end).

Needs: signature roles. Provides: grad all-reduces with meta[ROLE]="grad_sync",
meta[TARGET]=parameter, meta[PLACEMENT]={axis: R}.
"""

from __future__ import annotations

import torch

from shardfx.graphs import meta
from shardfx.graphs.placement import Replicate
from shardfx.graphs.program import DistProgram
from shardfx.graphs.rewrite import insert_call
from shardfx.graphs.signature import GRAD, LOSS
from shardfx.passes.manager import PassContext, PassResult

ALL_REDUCE = torch.ops.shardfx.all_reduce.default


def data_parallel(program: DistProgram, ctx: PassContext, *, axis: str = "dp") -> PassResult:
    graph = program.graph
    outputs = program.outputs()
    n_reduced = 0
    nbytes = 0
    for i, spec in enumerate(program.signature.outputs):
        value = outputs[i]
        if spec.role == GRAD:
            with graph.inserting_after(value):
                reduced = insert_call(
                    program, ALL_REDUCE, (value, axis, "avg"), provenance=value, origin="data_parallel"
                )
            reduced.meta[meta.ROLE] = "grad_sync"
            reduced.meta[meta.TARGET] = spec.target
            reduced.meta[meta.PLACEMENT] = {axis: Replicate()}
            outputs[i] = reduced
            n_reduced += 1
            nbytes += value.meta["val"].numel() * value.meta["val"].element_size()
        elif spec.role == LOSS:
            with graph.inserting_before(program.output_node()):
                mean = insert_call(program, ALL_REDUCE, (value, axis, "avg"), provenance=value, origin="data_parallel")
            mean.meta[meta.ROLE] = "loss"
            outputs[i] = mean
    program.set_outputs(outputs)
    return PassResult(program, {"grad_all_reduces": n_reduced, "grad_bytes": nbytes})
