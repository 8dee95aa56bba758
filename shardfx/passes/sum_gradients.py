"""sum_gradients: the last micro-batch of a step that reduces every micro-batch adds the kept sum in.

Under grad_accum_sync="micro_batch" (or with accumulate_gradients disabled)
every micro-batch reduces its own gradients, and the rank keeps their sum in
`.grad` between micro-batches. So that the step's gradient norm and clipping
are computed by the program, on the whole step's gradient, the program of the
last micro-batch takes that kept sum as an input (role GRAD_SUM: the reduced
gradient, or ZeRO-2/3 shard, of each parameter, zeros when nothing is kept) and
returns `kept + reduced` as the parameter's gradient. The runtime then replaces
`.grad` with it instead of adding. The norm and clip passes after this one see
the sum of every micro-batch's reduced gradient, as one device's step would.

Runs after the sharding pass and mixed precision (the sum is in the gradient's
final dtype and layout), before clip_gradients / grad_norm.
Needs: reduced gradients (grad_sync). Provides: GRAD_SUM inputs.
"""

from __future__ import annotations

import torch

from shardfx.graphs.program import DistProgram
from shardfx.graphs.rewrite import add_gradient_input, insert_call
from shardfx.graphs.signature import GRAD, GRAD_SUM
from shardfx.passes.manager import PassContext, PassResult

ORIGIN = "sum_gradients"
aten = torch.ops.aten


def sum_gradients(program: DistProgram, ctx: PassContext) -> PassResult:
    outputs = program.outputs()
    added = 0
    for i, spec in enumerate(list(program.signature.outputs)):
        if spec.role != GRAD:
            continue
        grad = outputs[i]
        kept = add_gradient_input(program, "kept_", grad, spec.target, GRAD_SUM, origin=ORIGIN)
        with program.graph.inserting_before(program.output_node()):
            outputs[i] = insert_call(program, aten.add.Tensor, (kept, grad), provenance=grad, origin=ORIGIN)
        added += 1
    program.set_outputs(outputs)
    return PassResult(program, {"kept_gradients": added})
