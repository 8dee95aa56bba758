"""clip_gradients / grad_norm: the global gradient norm, computed in the program; optionally clip to it.

Runs after the gradients are reduced, so it sees each rank's part of the final
gradient. Parameters are grouped by the mesh axes their gradient is split over
(ZeRO's dp shards, tensor parallelism's tp slices, both, or none): a group's
squared norms are summed locally, then all-reduced (sum) over each of its axes,
so every distinct piece counts once (padding rows are zero and add nothing; a
replicated gradient is the same on every rank and is not reduced). One scalar
all-reduce per mesh axis, carrying every group split over that axis.

The norm adds no round trip of its own: the step already averages its loss
over the data-parallel ranks with a scalar all-reduce (role "loss"), and that
one is folded into the norm's all-reduce over the same axis (the local loss
travels beside the squared norms; the mean is the sum over the ranks divided by
their count, as the runtimes average). It then happens at the end of the step
instead of after the forward. Where no norm crosses ranks (ZeRO-0: every
gradient is whole on every rank), the loss rides on the last gradient all-reduce
over its axis instead (one more element of the same average). A loss that is not
fp32, or that finds no all-reduce to ride on, keeps its own.

The program returns the norm (output role GRAD_NORM) for the engine's
non-finite check and its stats. With max_norm, the gradients are also scaled by
torch's coefficient min(1, max_norm / (norm + 1e-6)), as
torch.nn.utils.clip_grad_norm_, which also returns the norm before clipping.

Needs: a sharding pass (reduced gradients, shard_specs). Provides: optimizer-phase nodes.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import Tensor

from shardfx.graphs import meta
from shardfx.graphs.program import DistProgram
from shardfx.graphs.rewrite import inline
from shardfx.graphs.signature import GRAD, GRAD_NORM, OutputSpec
from shardfx.passes.manager import PassContext, PassResult


def _sum_of_squares(grads: list[Tensor]) -> Tensor:
    """sum(g.float().pow(2).sum() for g in grads), in one _foreach_norm per kind of dtype: 16-bit
    gradients' norms are taken in fp32, the others' in their own dtype (fp64 is not narrowed in the norm)."""
    narrow = [g for g in grads if g.dtype in (torch.float16, torch.bfloat16)]
    wide = [g for g in grads if g.dtype not in (torch.float16, torch.bfloat16)]
    norms = list(torch._foreach_norm(narrow, 2, dtype=torch.float32)) if narrow else []
    norms += [n.float() for n in torch._foreach_norm(wide, 2)] if wide else []
    return torch.stack(norms).pow(2).sum()


def clip_gradients(program: DistProgram, ctx: PassContext, *, max_norm: float | None, eps: float = 1e-6) -> PassResult:
    """max_norm=None only measures (the pipeline names that pass "grad_norm"). The gradients of a step
    of k micro-batches are their sum, k times the mean one device clips: the pipeline passes
    max_norm and eps times k, which gives torch's coefficient on the mean exactly."""
    outputs = program.outputs()
    indices = [i for i, s in enumerate(program.signature.outputs) if s.role == GRAD]
    if not indices:
        return PassResult(program, {"clipped": 0, "loss_folded": False})
    # the axes each gradient is split over, in mesh order; one group per distinct set
    splits = [
        tuple(
            a for a in program.mesh.names if a in {s.axis for s in program.specs(program.signature.outputs[i].target)}
        )
        for i in indices
    ]
    groups = sorted(set(splits))
    member = [groups.index(s) for s in splits]
    axes = [a for a in program.mesh.names if any(a in g for g in groups)]
    loss_sync = _foldable_loss_sync(program, axes)
    loss_axis = loss_sync.args[1] if loss_sync is not None else None
    folded_in_gradient = loss_sync is None and _fold_into_gradient_all_reduce(program)
    if folded_in_gradient:
        outputs = program.outputs()  # a gradient output is now the folded all-reduce's slice
    ranks = program.mesh.size(loss_axis) if loss_axis is not None else 1

    def norm_and_clip(*args: Tensor) -> tuple[Tensor, ...]:
        grads = args[: len(indices)]
        # each group's sum of squares from fused passes over its gradients, not a square and a sum
        # per gradient: no temporaries, one read of each; fp32 norms (16-bit gradients accumulate in fp32)
        sums = [_sum_of_squares([g for g, m in zip(grads, member) if m == k]) for k in range(len(groups))]
        mean_loss: list[Tensor] = []
        for axis in axes:  # every group split over `axis` in one all-reduce
            split = [k for k, group in enumerate(groups) if axis in group]
            carried = [sums[k] for k in split]
            if axis == loss_axis:  # the step's loss rides along: its own all-reduce is folded in here
                carried.append(args[-1])
            reduced = torch.ops.shardfx.all_reduce(torch.stack(carried), axis, "sum")
            for j, k in enumerate(split):
                sums[k] = reduced[j]
            if axis == loss_axis:
                mean_loss.append(reduced[-1] / ranks)
        norm = torch.stack(sums).sum().sqrt()
        if max_norm is None:
            return (norm, *mean_loss)
        coef = torch.clamp(max_norm / (norm + eps), max=1.0)
        return (norm, *mean_loss, *(g * coef.to(g.dtype) for g in grads))

    before = set(program.graph.nodes)
    inputs = [outputs[i] for i in indices] + ([loss_sync.args[0]] if loss_sync is not None else [])
    with program.graph.inserting_before(program.output_node()):
        norm, *rest = inline(
            program,
            norm_and_clip,
            inputs,
            provenance=outputs[indices[-1]],
            origin="clip_gradients" if max_norm is not None else "grad_norm",
        )
    if loss_sync is not None:
        mean, *clipped = rest
        loss_sync.replace_all_uses_with(mean)
        program.graph.erase_node(loss_sync)
        outputs = program.outputs()
    else:
        clipped = rest
    for node in program.graph.nodes:
        if node not in before:  # about every gradient: the optimizer phase of the whole model
            node.meta[meta.PHASE] = meta.OPTIMIZER
            node.meta[meta.MODULE] = ""
    for i, new in zip(indices, clipped):
        outputs[i] = new
    program.set_outputs([*outputs, norm])
    program.signature.outputs.append(OutputSpec(GRAD_NORM))
    return PassResult(
        program,
        {
            "clipped": len(clipped),
            "norm_groups": len(groups),
            "loss_folded": loss_sync is not None or folded_in_gradient,
        },
    )


def _fold_into_gradient_all_reduce(program: DistProgram) -> bool:
    """Average the loss in the last gradient all-reduce over its axis (ZeRO-0: the norm is local):
    all_reduce(cat([g.flatten(), loss.reshape(1)]), avg) in place of the two. False: nothing to fold."""
    loss_sync = _foldable_loss_sync(program, list(program.mesh.names))
    if loss_sync is None:
        return False
    _, axis, op = loss_sync.args
    grads = [
        n
        for n in program.graph.nodes
        if n.target is torch.ops.shardfx.all_reduce.default
        and n.meta.get(meta.ROLE) == meta.GRAD_SYNC
        and n.args[1:] == (axis, op)
        and n.args[0].meta["val"].dtype == torch.float32
    ]
    if not grads:
        return False
    grad = grads[-1]
    shape = tuple(grad.args[0].meta["val"].shape)

    def reduce_both(g: Tensor, loss: Tensor) -> tuple[Tensor, Tensor]:
        flat = torch.ops.shardfx.all_reduce(torch.cat([g.reshape(-1), loss.reshape(1)]), axis, op)
        return flat[:-1].view(shape), flat[-1]

    before = set(program.graph.nodes)
    with program.graph.inserting_before(grad):
        reduced, mean = inline(
            program, reduce_both, [grad.args[0], loss_sync.args[0]], provenance=grad, origin="grad_norm"
        )
    merged = next(
        n for n in program.graph.nodes if n not in before and n.target is torch.ops.shardfx.all_reduce.default
    )
    for key in (meta.ROLE, meta.TARGET, meta.PHASE, meta.MODULE):
        if key in grad.meta:
            merged.meta[key] = grad.meta[key]
    if meta.PLACEMENT in grad.meta:
        reduced.meta[meta.PLACEMENT] = grad.meta[meta.PLACEMENT]
    grad.replace_all_uses_with(reduced)
    program.graph.erase_node(grad)
    loss_sync.replace_all_uses_with(mean)
    program.graph.erase_node(loss_sync)
    return True


def _foldable_loss_sync(program: DistProgram, axes: list[str]) -> fx.Node | None:
    """The step's loss all-reduce (synchronous, averaging an fp32 value over one of `axes`, read by
    nothing but the program's output), if there is exactly one: the norm's all-reduce carries it."""
    found = [n for n in program.graph.nodes if n.op == "call_function" and n.meta.get(meta.ROLE) == meta.LOSS_SYNC]
    if len(found) != 1:
        return None
    node = found[0]
    val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if (
        node.target is not torch.ops.shardfx.all_reduce.default
        or node.args[1] not in axes
        or node.args[2] != "avg"
        or not isinstance(val, Tensor)
        or val.dtype != torch.float32
        or val.dim() != 0
        or any(user.op != "output" for user in node.users)
    ):
        return None
    return node
