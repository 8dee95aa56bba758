"""ZeRO-2: as ZeRO-1 (shard_optimizer_state.py), but each gradient is reduce-scattered
right where it is produced, so the full gradient does not outlive its reduction.

Needs: signature roles. Provides: ShardSpec per parameter, meta[PLACEMENT], gathers and reduce-scatters.
"""

from __future__ import annotations

from shardfx.graphs.program import DistProgram
from shardfx.passes.manager import PassContext, PassResult
from shardfx.passes.sharding import gather_all_at_top, sync_grads, sync_loss


def shard_gradients(program: DistProgram, ctx: PassContext, *, axis: str = "dp") -> PassResult:
    gathers = gather_all_at_top(program, axis, "shard_gradients")
    n_rs, n_ar = sync_grads(program, axis, "shard_gradients", at_end=False)
    sync_loss(program, axis, "shard_gradients")
    return PassResult(program, {"all_gathers": gathers, "reduce_scatters": n_rs, "all_reduces": n_ar})
