"""apply_mixed_precision: fp32 master parameters, bf16 compute and transfers, fp32 (or bf16) gradient reduction.

The step was captured on a bf16 copy of the model, so everything between the
parameters and the gradients already computes in bf16. This pass makes the
parameter placeholders the fp32 masters the optimizer updates, casts each
right before it is read (before the all-gather under ZeRO: half the traffic),
and reduces each gradient in `reduce_dtype`, handing fp32 gradients to the
optimizer. Runs after the sharding pass. Changes numerics (exact=False).

Needs: a sharding pass (grad_sync nodes). Provides: casts with origin "apply_mixed_precision".
"""

from __future__ import annotations

import torch
import torch.fx as fx

from shardfx.graphs import meta
from shardfx.graphs.program import DistProgram
from shardfx.graphs.rewrite import insert_call, refresh_val
from shardfx.graphs.signature import GRAD, PARAM
from shardfx.passes.manager import PassContext, PassResult

ORIGIN = "apply_mixed_precision"
TO_COPY = torch.ops.aten._to_copy.default
PAD = torch.ops.aten.constant_pad_nd.default


def apply_mixed_precision(
    program: DistProgram, ctx: PassContext, *, param_dtype: torch.dtype, reduce_dtype: torch.dtype
) -> PassResult:
    casts = 0
    for spec, node in zip(program.signature.inputs, program.placeholders()):
        val = node.meta["val"]
        if spec.role != PARAM or val.dtype != param_dtype:
            continue
        with program.fake_mode:
            node.meta["val"] = torch.empty(val.shape, dtype=torch.float32, device=val.device)
        for user in list(node.users):
            with program.graph.inserting_before(user):
                cast = insert_call(program, TO_COPY, (node,), {"dtype": param_dtype}, provenance=user, origin=ORIGIN)
            user.replace_input_with(node, cast)
            casts += 1
    outputs = program.outputs()
    for i, spec in enumerate(program.signature.outputs):
        if spec.role != GRAD or outputs[i].meta["val"].dtype == torch.float32:
            continue
        outputs[i] = _reduce_in(program, outputs[i], reduce_dtype)
    program.set_outputs(outputs)
    return PassResult(program, {"param_casts": casts})


def _reduce_in(program: DistProgram, synced: fx.Node, reduce_dtype: torch.dtype) -> fx.Node:
    """Make the gradient reduction `synced` run in reduce_dtype; return an fp32 gradient node."""
    assert meta.role(synced) == meta.GRAD_SYNC, synced.format_node()
    if reduce_dtype == torch.float32:
        chain = [synced]  # the reduction, and the padding before it if any
        if synced.args[0].target is PAD:
            chain.insert(0, synced.args[0])
        raw = chain[0].args[0]
        with program.graph.inserting_after(raw):
            cast = insert_call(program, TO_COPY, (raw,), {"dtype": torch.float32}, provenance=raw, origin=ORIGIN)
        chain[0].replace_input_with(raw, cast)
        for node in chain:
            refresh_val(program, node)
        return synced
    with program.graph.inserting_after(synced):
        return insert_call(program, TO_COPY, (synced,), {"dtype": torch.float32}, provenance=synced, origin=ORIGIN)
