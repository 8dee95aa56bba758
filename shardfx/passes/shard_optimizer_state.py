"""ZeRO-1: shard_optimizer_state (ZeRO-2, shard_gradients.py, differs only in when gradients reduce).

Each rank owns a dim-0 shard of every parameter: its optimizer state and the
fp32 master copy exist only for that shard. At the top of the step every
shard is all-gathered into the full replica the step computes with (the
all-gather DeepSpeed runs after the optimizer step, placed at the start of
the next step so it is part of the graph). Gradients are reduce-scattered so
the optimizer sees only this rank's gradient shard:

- ZeRO-1 (shard_optimizer_state): after the whole backward;
- ZeRO-2 (shard_gradients): right where each gradient is produced, so the full
  gradient does not outlive its reduction.

Traffic per step: one all-gather and one reduce-scatter of every parameter, 2x
the parameter bytes, as DDP's all-reduce.

Needs: signature roles. Provides: ShardSpec per parameter, meta[PLACEMENT], gathers and reduce-scatters.
"""

from __future__ import annotations

from shardfx.graphs.program import DistProgram
from shardfx.passes.manager import PassContext, PassResult
from shardfx.passes.sharding import gather_all_at_top, sync_grads, sync_loss


def shard_optimizer_state(program: DistProgram, ctx: PassContext, *, axis: str = "dp") -> PassResult:
    gathers = gather_all_at_top(program, axis, "shard_optimizer_state")
    n_rs, n_ar = sync_grads(program, axis, "shard_optimizer_state", at_end=True)
    sync_loss(program, axis, "shard_optimizer_state")
    return PassResult(program, {"all_gathers": gathers, "reduce_scatters": n_rs, "all_reduces": n_ar})
