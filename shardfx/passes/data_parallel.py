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

from shardfx.graphs.program import DistProgram
from shardfx.passes.manager import PassContext, PassResult
from shardfx.passes.sharding import sync_grads, sync_loss


def data_parallel(program: DistProgram, ctx: PassContext, *, axis: str = "dp") -> PassResult:
    _, n_ar = sync_grads(program, axis, "data_parallel", at_end=False)
    sync_loss(program, axis, "data_parallel")
    return PassResult(program, {"grad_all_reduces": n_ar})
