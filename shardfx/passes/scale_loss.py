"""scale_loss: fp16 loss scaling inside the program.

fp16 gradients of small magnitude flush to zero. As DeepSpeed and torch.amp do, the loss is
multiplied by a scale S before the backward, so every gradient is S times larger while it
is fp16, and divided by S once it is reduced and fp32:

- a new scalar input (signature role LOSS_SCALE, fp32), bound by the runtime to the Engine's
  current scale each step;
- the backward's seed, d loss / d loss = 1 (meta role LOSS_SEED, made by capture), becomes S;
- every GRAD output (the reduced gradient, fp32 after apply_mixed_precision) is multiplied by
  1 / S. With S a power of two that is exact.

So the gradient norm (computed after this pass) is the norm of the true gradients: an
overflow in the scaled backward makes it inf or NaN, which the Engine's loss scaler reads to
skip the step and lower the scale. Accumulated gradients (GRAD_ACC) stay scaled: the last
micro-batch's reduction of their sum is what gets unscaled; the scale changes only between
optimizer steps, so every micro-batch of a step is scaled alike.

Runs after apply_mixed_precision and before sum_gradients (the reduced sum it adds in was
unscaled by earlier micro-batches). Needs: the loss seed, reduced gradients. Changes numerics
only by the rounding fp16 would otherwise lose (exact=False).
"""

from __future__ import annotations

import torch

from shardfx.errors import ShardfxError
from shardfx.graphs import meta
from shardfx.graphs.program import DistProgram
from shardfx.graphs.rewrite import add_input, insert_call
from shardfx.graphs.signature import GRAD, LOSS_SCALE
from shardfx.passes.manager import PassContext, PassResult

ORIGIN = "scale_loss"
MUL = torch.ops.aten.mul.Tensor


def scale_loss(program: DistProgram, ctx: PassContext) -> PassResult:
    seeds = [n for n in program.graph.nodes if meta.role(n) == meta.LOSS_SEED]
    if not seeds and not any(spec.role == GRAD for spec in program.signature.outputs):
        return PassResult(program, {"unscaled_gradients": 0})  # eval_step's forward-only program: no backward
    if len(seeds) != 1:
        raise ShardfxError(f"scale_loss needs the one backward seed capture marks; found {len(seeds)}")
    (seed,) = seeds
    with program.fake_mode:
        scalar = torch.empty((), dtype=torch.float32, device=seed.meta["val"].device)
    scale = add_input(program, "loss_scale", scalar, LOSS_SCALE, "loss_scale", provenance=seed, origin=ORIGIN)
    with program.graph.inserting_after(seed):
        scaled = insert_call(program, MUL, (seed, scale), provenance=seed, origin=ORIGIN, val=seed.meta["val"])
    seed.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
    outputs = program.outputs()
    grads = [i for i, spec in enumerate(program.signature.outputs) if spec.role == GRAD]
    if grads:
        with program.graph.inserting_before(program.output_node()):
            inverse = insert_call(
                program, torch.ops.aten.reciprocal.default, (scale,), provenance=outputs[grads[0]], origin=ORIGIN
            )
            for i in grads:
                grad = outputs[i]
                if grad.meta["val"].dtype != torch.float32:
                    raise ShardfxError(
                        f"scale_loss unscales fp32 gradients; {program.signature.outputs[i].target} is "
                        f"{grad.meta['val'].dtype} (apply_mixed_precision must run first)",
                        grad,
                    )
                outputs[i] = insert_call(program, MUL, (grad, inverse), provenance=grad, origin=ORIGIN)
                outputs[i].meta[meta.PHASE] = meta.OPTIMIZER
    program.set_outputs(outputs)
    return PassResult(program, {"unscaled_gradients": len(grads)})
