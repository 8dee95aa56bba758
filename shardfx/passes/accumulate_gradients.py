"""accumulate_gradients: gradient accumulation with one reduction per optimizer step.

With Config(grad_accum_steps=k) and grad_accum_sync="boundary", the step is
compiled twice from one capture, as two variants of the same graph:

  "keep"    micro-batches 1 .. k-1: every gradient g of parameter p is added to
            a per-rank accumulator: the graph takes `acc_p` as an input and
            returns `acc_p + g` (output role GRAD_ACC) instead of a gradient.
            Nothing is reduced, so the sharding pass that runs next finds no
            gradient to reduce (DeepSpeed's and FSDP's no_sync).
  "reduce"  micro-batch k: the gradient output becomes `acc_p + g`, and the
            sharding pass reduces (reduce-scatters) that sum, once, exactly as
            it reduces a plain step's gradient: same collectives, same bytes,
            same bucketing and overlap behind the backward.

The accumulators hold a rank's full (tensor-parallel-local) unreduced
gradient between micro-batches, in fp32 under bf16 mixed precision. That is
the price of deferring: under ZeRO-2/3 a rank holds the whole gradient, not
its 1/N shard, while accumulating. grad_accum_sync="micro_batch" reduces every
micro-batch instead (k times the gradient traffic, no full-size buffer).

Runs after tensor_parallel and recompute, before the data-parallel pass.
Needs: GRAD outputs. Provides: GRAD_ACC inputs (and outputs in "keep").
"""

from __future__ import annotations

import torch

from shardfx.graphs.program import DistProgram
from shardfx.graphs.rewrite import add_gradient_input, insert_call
from shardfx.graphs.signature import GRAD, GRAD_ACC, OutputSpec
from shardfx.passes.manager import PassContext, PassResult

ORIGIN = "accumulate_gradients"
VARIANTS = ("keep", "reduce")
aten = torch.ops.aten


def accumulate_gradients(
    program: DistProgram,
    ctx: PassContext,
    *,
    variant: str,
    acc_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
) -> PassResult:
    """acc_dtype: the accumulators' dtype (None: the gradient's); reduce_dtype: cast the
    "reduce" variant's sum to this before the reduction (None: leave it)."""
    if variant not in VARIANTS:
        raise ValueError(f"accumulate_gradients variant must be one of {list(VARIANTS)}; got {variant!r}")
    graph = program.graph
    outputs = program.outputs()
    added = 0
    for i, spec in enumerate(list(program.signature.outputs)):
        if spec.role != GRAD:
            continue
        grad = outputs[i]
        acc = add_gradient_input(program, "acc_", grad, spec.target, GRAD_ACC, origin=ORIGIN, dtype=acc_dtype)
        # Right after the gradient is made, so its reduction can still start behind the backward.
        with graph.inserting_after(grad):
            total = insert_call(program, aten.add.Tensor, (acc, grad), provenance=grad, origin=ORIGIN)
        if variant == "reduce" and reduce_dtype is not None and total.meta["val"].dtype != reduce_dtype:
            with graph.inserting_after(total):
                total = insert_call(
                    program, aten._to_copy.default, (total,), {"dtype": reduce_dtype}, provenance=grad, origin=ORIGIN
                )
        outputs[i] = total
        if variant == "keep":
            program.signature.outputs[i] = OutputSpec(GRAD_ACC, spec.target)
        added += 1
    program.set_outputs(outputs)
    return PassResult(program, {"accumulators": added, "variant": variant})
