"""Vocab-parallel embedding, head and cross-entropy (Megatron's), as tensor-parallel rules.

The vocab dim V of the word embedding (V, E) and of the head that feeds the
cross-entropy splits over the tp ranks: rank r holds rows [r V/tp, (r+1) V/tp),
and the full logits never exist on one rank.
- embedding: each rank looks up the ids in its rows and zeroes the others: a
  partial sum over the ranks (one all-reduce of (B, L, E), as Megatron).
- its gradient: each rank accumulates the rows it holds (no communication).
- log_softmax over the split classes: the max and the sum of exponentials are
  all-reduced ((N, 1) each), so each rank keeps its (N, V/tp) slice.
- nll_loss: each rank picks the targets it holds; one all-reduce of (N,).
- their backward: local, but for one all-reduce of (N, 1) (the gradient's sum).
A head tied to the embedding holds the same rows for both uses.

Rank-dependent indices come from `shardfx.local_index` (ids - rank * V/tp), so
the program stays one graph for every rank. Each rule returns (output placement,
rewrite) for the ops that read no split input besides the weight (embedding, log_softmax), else
(output placement, rewrite, the inputs that stay split): the rewrite replaces the op with these local ops and
collectives; every other input is made whole first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from shardfx.graphs import collectives, meta
from shardfx.graphs.placement import Partial, Shard
from shardfx.passes import redistribute

aten = torch.ops.aten
Make = Callable[..., fx.Node]


def _owned(make: Make, ids: Any, axis: str, rows: int) -> tuple[fx.Node, fx.Node]:
    """(index into this rank's rows, clamped to 0 elsewhere; whether this rank holds the row)."""
    local = make(collectives.LOCAL_INDEX, (ids, axis, rows))
    inside = make(aten.logical_and.default, (make(aten.ge.Scalar, (local, 0)), make(aten.lt.Scalar, (local, rows))))
    return make(aten.mul.Tensor, (local, inside)), inside


def _all_reduce(make: Make, x: fx.Node, axis: str, op: str = "sum") -> fx.Node:
    return redistribute.all_reduce(make, x, axis, op, role=meta.TP_REDISTRIBUTE)


def embedding(node: fx.Node, weight_pl: Any, tp: int) -> Any:
    """(output placement, rewrite) for embedding(weight S(0), ids), or None."""
    if weight_pl != Shard(0):  # padding_idx only changes the backward (handled there)
        return None
    rows = node.args[0].meta["val"].shape[0] // tp

    def rewrite(make: Make, axis: str) -> fx.Node:
        weight, ids = node.args[:2]
        safe, inside = _owned(make, ids, axis, rows)
        looked = make(aten.embedding.default, (weight, safe))
        return make(aten.mul.Tensor, (looked, make(aten.unsqueeze.default, (inside, -1))))

    return Partial(), rewrite


def embedding_backward(node: fx.Node, placements: dict, tp: int) -> Any:
    """embedding_dense_backward(grad, ids, V, padding_idx, scale) whose ids index a vocab-parallel
    embedding: this rank's rows only, S(0). None when no such embedding reads these ids."""
    grad, ids, num_weights, padding_idx, scale = node.args[:5]
    split = any(
        u.target is aten.embedding.default
        and placements.get(u.args[0]) == Shard(0)
        and u.args[0].meta["val"].shape[0] == num_weights
        for u in ids.users
    )
    if not split or scale:  # scale_grad_by_freq counts ids over the whole vocab
        return None
    rows = num_weights // tp

    def rewrite(make: Make, axis: str) -> fx.Node:
        grad, ids = node.args[:2]  # read again: the rewrite of an earlier node may have replaced them
        safe, inside = _owned(make, ids, axis, rows)
        keep = (
            inside
            if padding_idx < 0
            else make(aten.logical_and.default, (inside, make(aten.ne.Scalar, (ids, padding_idx))))
        )
        masked = make(aten.mul.Tensor, (grad, make(aten.unsqueeze.default, (keep, -1))))
        return make(aten.embedding_dense_backward.default, (masked, safe, rows, -1, False))

    return Shard(0), rewrite, ()


def log_softmax(node: fx.Node, p: Shard, tp: int) -> Any:
    """log_softmax over the split classes: x - max - log(sum(exp(x - max))), max and sum all-reduced."""
    dim = node.args[1] % node.args[0].meta["val"].dim()
    if p.dim != dim or p.blocks != 1:
        return None

    def rewrite(make: Make, axis: str) -> fx.Node:
        x = node.args[0]
        top = _all_reduce(make, make(aten.amax.default, (x, [dim], True)), axis, "max")  # (N, 1)
        shifted = make(aten.sub.Tensor, (x, top))
        total = _all_reduce(make, make(aten.sum.dim_IntList, (make(aten.exp.default, (shifted,)), [dim], True)), axis)
        return make(aten.sub.Tensor, (shifted, make(aten.log.default, (total,))))

    return p, rewrite


def log_softmax_backward(node: fx.Node, placements: dict, tp: int) -> Any:
    """grad - exp(out) * sum(grad) over the split classes: the sum all-reduced."""
    grad, out, dim = node.args[:3]
    dim %= out.meta["val"].dim()
    if not (placements.get(grad) == placements.get(out) == Shard(dim)) or grad.meta["val"].dtype != node.args[3]:
        return None

    def rewrite(make: Make, axis: str) -> fx.Node:
        grad, out = node.args[:2]
        total = _all_reduce(make, make(aten.sum.dim_IntList, (grad, [dim], True)), axis)
        return make(aten.sub.Tensor, (grad, make(aten.mul.Tensor, (make(aten.exp.default, (out,)), total))))

    return Shard(dim), rewrite, (grad, out)


MEAN, SUM = 1, 2  # torch's Reduction enum


def nll_loss(node: fx.Node, placements: dict, tp: int) -> Any:
    """nll_loss_forward(logp (N, C) S(1), target, None, mean|sum, ignore_index) -> (loss, total_weight):
    each rank picks the targets it holds, the picked values all-reduced."""
    logp, target, weight, reduction, ignore = node.args[:5]
    if placements.get(logp) != Shard(1) or weight is not None or reduction not in (MEAN, SUM):
        return None
    if logp.meta["val"].dim() != 2:
        return None
    rows = logp.meta["val"].shape[1] // tp

    def rewrite(make: Make, axis: str) -> list[fx.Node]:
        logp, target = node.args[:2]
        safe, inside = _owned(make, target, axis, rows)
        picked = make(aten.gather.default, (logp, 1, make(aten.unsqueeze.default, (safe, 1))))
        mine = make(aten.mul.Tensor, (make(aten.squeeze.dim, (picked, 1)), inside))
        picked_all = _all_reduce(make, mine, axis)  # (N,): every target's log-probability
        valid = make(aten.ne.Scalar, (target, ignore))
        dtype = logp.meta["val"].dtype
        count = make(aten.sum.default, (make(aten._to_copy.default, (valid,), {"dtype": dtype}),))
        total = make(aten.neg.default, (make(aten.sum.default, (make(aten.mul.Tensor, (picked_all, valid)),)),))
        loss = make(aten.div.Tensor, (total, count)) if reduction == MEAN else total
        return [loss, count]

    return (None, None), rewrite, (logp,)


def nll_loss_backward(node: fx.Node, placements: dict, tp: int) -> Any:
    """-grad (/ total_weight) at each row's target, on the rank that holds it: S(1), no communication."""
    grad, logp, target, weight, reduction, ignore, total_weight = node.args[:7]
    if placements.get(logp) != Shard(1) or weight is not None or reduction not in (MEAN, SUM):
        return None
    rows = logp.meta["val"].shape[1] // tp

    def rewrite(make: Make, axis: str) -> fx.Node:
        grad, logp, target = node.args[:3]
        total_weight = node.args[6]
        safe, inside = _owned(make, target, axis, rows)
        keep = make(aten.logical_and.default, (inside, make(aten.ne.Scalar, (target, ignore))))
        scale = make(aten.neg.default, (grad,))
        if reduction == MEAN:
            scale = make(aten.div.Tensor, (scale, total_weight))
        values = make(aten.mul.Tensor, (make(aten.unsqueeze.default, (keep, 1)), scale))
        zeros = make(aten.zeros_like.default, (logp,))
        return make(aten.scatter.src, (zeros, 1, make(aten.unsqueeze.default, (safe, 1)), values))

    return Shard(1), rewrite, (logp,)
