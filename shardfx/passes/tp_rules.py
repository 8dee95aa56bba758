"""Sharding rules of the tensor-parallel pass: one row per ATen op.

A rule takes a node and the placements of its inputs on the "tp" axis (R
replicated, S(dim, blocks) sharded, P partial sum) and returns a Decision: the
placement of its output(s) and the inputs it needs in another placement (the
pass inserts the redistribution). Which rule an op gets is a column of the op
table (graphs/ops.py: OpFacts.tp names a family of FAMILIES); an op without
one gets replicated inputs: correct, and reported when that means gathering
shards. Adding an op means adding a row to that table. `propagate` applies the
rules to every node in graph order (forward then backward) without changing
the graph: tensor_parallel inserts the redistributions they ask for.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from shardfx.graphs import ops
from shardfx.graphs.placement import Partial, Replicate, Shard
from shardfx.graphs.program import DistProgram
from shardfx.passes import tp_vocab

aten = torch.ops.aten
R = Replicate()
P = Partial()
# Sequence parallelism (Config.sequence_parallel): the sequence length while propagate runs with it
_sequence: contextvars.ContextVar[int | None] = contextvars.ContextVar("shardfx_tp_sequence", default=None)


@dataclass
class Decision:
    out: Any  # a placement, or a tuple of them for multi-output ops
    want: dict[fx.Node, Any] = field(default_factory=dict)  # inputs that must be redistributed first
    fallback: bool = False  # the op has no rule: inputs made replicated
    decompose_addmm: bool = False  # rowwise addmm: all_reduce(mm) + bias
    rewrite: Callable[..., Any] | None = None  # rewrite(make, axis) -> the local node(s) replacing this op


def _pl(node: Any, placements: dict[fx.Node, Any]) -> Any:
    return placements.get(node, R) if isinstance(node, fx.Node) else None


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["val"].shape)


def replicate_all(node: fx.Node, placements: dict) -> Decision:
    """Run the op on whole tensors: partial sums are all-reduced (Megatron's own points), shards gathered.

    Gathering shards is the fallback that costs: it is what the pass reports by op name."""
    want = {a: R for a in node.all_input_nodes if _pl(a, placements) != R}
    val = node.meta.get("val")
    out = tuple(R for _ in val) if isinstance(val, (tuple, list)) else R
    return Decision(out, want, fallback=any(isinstance(_pl(a, placements), Shard) for a in want))


POINTWISE = ops.with_tp_rule("pointwise")  # the rows of graphs/ops.py with the pointwise rule
LINEAR_IN_P = {  # ops linear in their P inputs (a partial sum passes through them)
    aten.add.Tensor, aten.sub.Tensor, aten.neg.default, aten.clone.default, aten.detach.default,
    aten.alias.default, aten._to_copy.default, torch.ops.prims.convert_element_type.default,
}  # fmt: skip
SCALED = {aten.mul.Scalar, aten.div.Scalar}  # x * c is linear: a partial sum scaled is the scaled sum


def _linear_in_partials(node: fx.Node, pls: list[Any]) -> bool:
    """Whether the op of partial sums is the partial sum of the op: every tensor input partial, and
    no constant added (x + 1.0 over tp ranks would add tp)."""
    if node.target not in LINEAR_IN_P | SCALED or not all(isinstance(p, Partial) for p in pls):
        return False
    if node.target in (aten.add.Tensor, aten.sub.Tensor):
        return all(isinstance(a, fx.Node) for a in node.args[:2])
    return True


def _pointwise(node: fx.Node, placements: dict) -> Decision:
    out_nd = node.meta["val"].dim()
    tensors = node.all_input_nodes
    pls = [_pl(a, placements) for a in tensors]
    partial = [a for a, p in zip(tensors, pls) if isinstance(p, Partial)]
    if partial and not _linear_in_partials(node, pls):
        split = _sequence_split(node, tensors, pls)
        if split is not None:
            return split
    if partial:
        # A partial sum passes through sums of partial sums, copies and scaling by a constant; any
        # other op reduces it first. Passing it through x * w too would reduce it later, at ops
        # that meet it twice (a norm's backward): more all-reduces than Megatron's one.
        linear = _linear_in_partials(node, pls)
        if linear:
            return Decision(P)
        return replicate_all(node, placements)
    dims = {(p.dim + out_nd - a.meta["val"].dim(), p.blocks) for a, p in zip(tensors, pls) if isinstance(p, Shard)}
    if not dims:
        return Decision(R)
    if len(dims) > 1:
        return replicate_all(node, placements)
    (dim, blocks), want = next(iter(dims)), {}
    for a, p in zip(tensors, pls):
        a_dim = dim - (out_nd - a.meta["val"].dim())
        if a_dim < 0 or a.meta["val"].shape[a_dim] == 1:
            continue  # broadcast along the sharded dim: every rank uses all of it
        if p != Shard(a_dim, blocks):
            want[a] = Shard(a_dim, blocks)
    return Decision(Shard(dim, blocks), want)


def _sequence_split(node: fx.Node, tensors: list[fx.Node], pls: list[Any]) -> Decision | None:
    """Sequence parallelism: a partial sum of shape (B, L, ...) that must be summed (it meets the
    residual stream, or a norm) is reduce-scattered along the sequence instead of all-reduced, and
    the element-wise op runs on this rank's tokens (S(1))."""
    length = _sequence.get()
    shape = _shape(node)
    if length is None or len(shape) < 2 or shape[1] != length:
        return None
    seq = Shard(1)
    want = {}
    for a, p in zip(tensors, pls):
        a_shape = _shape(a)
        lead = len(shape) - len(a_shape)
        if 1 - lead < 0 or a_shape[1 - lead] == 1:
            if not p == R:
                return None  # a partial sum or a shard broadcast along the sequence: no such rule
            continue  # broadcast along the sequence: whole on every rank
        if isinstance(p, Shard) and p != Shard(1 - lead):
            return None
        if p != Shard(1 - lead):
            want[a] = Shard(1 - lead)  # P: reduce-scatter; R: this rank's tokens (free)
    return Decision(seq, want)


def _groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of dims of two shapes with equal products (the dims a view merges or splits)."""
    out, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        ga, gb = [i] if i < len(a) else [], [j] if j < len(b) else []
        pa = a[i] if i < len(a) else 1
        pb = b[j] if j < len(b) else 1
        i, j = i + bool(ga), j + bool(gb)
        while pa != pb:
            if pa < pb and i < len(a):
                ga.append(i)
                pa *= a[i]
                i += 1
            elif pb < pa and j < len(b):
                gb.append(j)
                pb *= b[j]
                j += 1
            else:
                return None
        out.append((ga, gb))
    return out


def carry(src: tuple[int, ...], p: Shard, out: tuple[int, ...], tp: int) -> Shard | None:
    """Where a reshape of `src` (sharded as p) to `out` puts the shard, or None when no Shard describes it.

    Within the run of dims the reshape merges or splits, S(d, blocks) reads as the flat run
    (O, S, I): O outer blocks (the dims before d times `blocks`), each block's S*I elements
    cut into tp equal chunks. Out dim j of the run, with B elements of the run before it,
    holds the same chunks as S(j, O/B) when B divides O and each of its O/B blocks divides by
    tp. Merging heads into (batch*heads) gives S(0, batch); splitting it back gives S(1);
    (B, L, H*D) -> (B, L, H, D) puts the shard on the heads."""
    for ga, gb in _groups(src, out) or []:
        if p.dim not in ga:
            continue
        outer = math.prod(src[k] for k in ga if k < p.dim) * p.blocks
        before = 1
        for j in gb:
            if outer % before == 0 and out[j] % (outer // before * tp) == 0:
                return Shard(j, outer // before)
            before *= out[j]
        return None
    return None


def _view(node: fx.Node, placements: dict, tp: int) -> Decision:
    src = node.args[0]
    p = _pl(src, placements)
    if p == R or isinstance(p, Partial):
        return Decision(p)
    moved = carry(_shape(src), p, _shape(node), tp)
    return Decision(moved) if moved is not None else replicate_all(node, placements)


def _dims(node: fx.Node, placements: dict, tp: int) -> Decision:
    """unsqueeze, squeeze, select, slice, expand: the shard moves with the dims around it; a slice
    or select of the sharded dim itself needs it whole (a full slice keeps it)."""
    src = node.args[0]
    p = _pl(src, placements)
    if not isinstance(p, Shard):
        return Decision(p)  # R stays R, a partial sum stays partial (these are linear)
    shape, t = _shape(src), node.target
    if t in (aten.slice_backward.default, aten.select_backward.default):
        # (grad, input_sizes, dim, ...): the gradient of a slice along another dim keeps the shard
        full = tuple(node.args[1])
        d = node.args[2] % len(full)
        at = p.dim + (t is aten.select_backward.default and d <= p.dim)
        return replicate_all(node, placements) if d == at else Decision(Shard(at, p.blocks))
    if t is aten.unsqueeze.default:
        d = node.args[1] % (len(shape) + 1)
        return Decision(Shard(p.dim + (d <= p.dim), p.blocks))
    if t in (aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims):
        given = node.args[1] if len(node.args) > 1 else list(range(len(shape)))
        given = [given] if isinstance(given, int) else given
        gone = [d % len(shape) for d in given if shape[d % len(shape)] == 1]
        return Decision(Shard(p.dim - sum(d < p.dim for d in gone), p.blocks))
    if t is aten.expand.default:
        return Decision(Shard(p.dim + len(node.args[1]) - len(shape), p.blocks))  # the sharded dim is > 1
    d = (node.args[1] if len(node.args) > 1 else 0) % len(shape)
    if d != p.dim:
        return Decision(Shard(p.dim - (t is aten.select.int and d < p.dim), p.blocks))
    if t is aten.slice.Tensor:
        start, end = (list(node.args[2:4]) + [None, None])[:2]
        step = node.args[4] if len(node.args) > 4 else 1
        if (start or 0) == 0 and (end is None or end >= shape[d]) and step == 1:
            return Decision(p)  # the whole dim
    return replicate_all(node, placements)


def _permute_dims(node: fx.Node) -> list[int]:
    nd = node.meta["val"].dim()
    if node.target is aten.t.default:
        return [1, 0] if nd == 2 else list(range(nd))
    if node.target is aten.transpose.int:
        perm = list(range(nd))
        d0, d1 = node.args[1] % nd, node.args[2] % nd
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return perm
    return [d % nd for d in node.args[1]]  # permute


def _permute(node: fx.Node, placements: dict, tp: int) -> Decision:
    p = _pl(node.args[0], placements)
    if not isinstance(p, Shard):
        return Decision(p)
    return Decision(Shard(_permute_dims(node).index(p.dim), p.blocks))


def _split(node: fx.Node, placements: dict, tp: int) -> Decision:
    """split / split_with_sizes: along another dim every part keeps the shard; along the sharded
    dim of k equal blocks, k*m blocks in k equal parts give each part m blocks (a fused q|k|v)."""
    src = node.args[0]
    dim = (node.args[2] if len(node.args) > 2 else 0) % src.meta["val"].dim()
    p = _pl(src, placements)
    n_out = len(node.meta["val"])
    if not isinstance(p, Shard) or p.dim != dim:
        return Decision(tuple(p for _ in range(n_out)))
    sizes = {tuple(v.shape)[dim] for v in node.meta["val"]}
    if len(sizes) == 1 and p.blocks % n_out == 0 and sizes.pop() * n_out == _shape(src)[dim]:
        return Decision(tuple(Shard(dim, p.blocks // n_out) for _ in range(n_out)))
    return replicate_all(node, placements)


def _unbind(node: fx.Node, placements: dict, tp: int) -> Decision:
    """unbind along another dim: every part keeps the shard (one dim fewer before it); along the
    sharded dim each part is one rank's slice, so the input must be whole."""
    src = node.args[0]
    dim = (node.args[1] if len(node.args) > 1 else 0) % src.meta["val"].dim()
    p = _pl(src, placements)
    n_out = len(node.meta["val"])
    if not isinstance(p, Shard):
        return Decision(tuple(p for _ in range(n_out)))
    if p.dim == dim:
        return replicate_all(node, placements)
    return Decision(tuple(Shard(p.dim - (dim < p.dim), p.blocks) for _ in range(n_out)))


def _alike(pls: list[Any]) -> Decision | None:
    """A join of whole tensors is whole, of partial sums a partial sum (the join is linear)."""
    if all(p == R for p in pls):
        return Decision(R)
    if all(isinstance(p, Partial) for p in pls):
        return Decision(P)
    return None


def _stack(node: fx.Node, placements: dict, tp: int) -> Decision:
    """stack of tensors sharded alike keeps the shard (one dim more at or before it); the inverse
    of unbind."""
    parts = node.args[0]
    dim = (node.args[1] if len(node.args) > 1 else 0) % node.meta["val"].dim()
    pls = [_pl(a, placements) for a in parts]
    alike = _alike(pls)
    if alike is not None:
        return alike
    if all(isinstance(p, Shard) and p == pls[0] for p in pls):
        return Decision(Shard(pls[0].dim + (dim <= pls[0].dim), pls[0].blocks))
    return replicate_all(node, placements)


def _cat(node: fx.Node, placements: dict, tp: int) -> Decision:
    """cat of k slices sharded along the cat dim is that dim in k blocks (the inverse of split)."""
    # torch.cat skips 1-D empty tensors (an empty key/value cache concatenated with the new keys)
    parts = [a for a in node.args[0] if tuple(a.meta["val"].shape) != (0,)]
    dim = (node.args[1] if len(node.args) > 1 else 0) % node.meta["val"].dim()
    pls = [_pl(a, placements) for a in parts]
    alike = _alike(pls)
    if alike is not None:
        return alike
    if all(isinstance(p, Shard) and p.blocks == 1 and p.dim == pls[0].dim for p in pls):
        if pls[0].dim != dim:
            return Decision(pls[0])
        if len({_shape(a)[dim] for a in parts}) == 1:  # k equal blocks (unequal ones are no S(dim, k))
            return Decision(Shard(dim, len(parts)))
    return replicate_all(node, placements)


def _getitem(node: fx.Node, placements: dict, tp: int) -> Decision:
    p = placements.get(node.args[0], R)
    return Decision(p[node.args[1]] if isinstance(p, tuple) else p)


def _mm(a_pl: Any, b_pl: Any) -> tuple[Any, dict[str, Any]] | None:
    """(output, wanted inputs) for a @ b, or None: replicate."""
    S0 = lambda p: isinstance(p, Shard) and p.dim == 0  # noqa: E731
    S1 = lambda p: isinstance(p, Shard) and p.dim == 1  # noqa: E731
    if a_pl == R and b_pl == R:
        return R, {}
    if a_pl == R and S1(b_pl):
        return Shard(1, b_pl.blocks), {}
    if S0(a_pl) and b_pl == R:
        return Shard(0, a_pl.blocks), {}
    if S1(a_pl) and S0(b_pl) and a_pl.blocks == b_pl.blocks:
        return P, {}
    if S1(a_pl) and b_pl == R:
        return P, {"b": Shard(0, a_pl.blocks)}
    if a_pl == R and S0(b_pl):
        return P, {"a": Shard(1, b_pl.blocks)}
    if isinstance(a_pl, Partial) and b_pl == R:
        return P, {}
    if a_pl == R and isinstance(b_pl, Partial):
        return P, {}
    return None


VIEWS_OF_WEIGHT = {aten.t.default, aten.transpose.int, aten.permute.default, aten.view.default, aten._to_copy.default}


def _is_weight(node: fx.Node) -> bool:
    """A placeholder (a parameter) or a transpose, view or cast of one: a tensor split to stay split.
    The capture names parameter placeholders p_<name> and batch inputs batch_<i> (graphs/capture.py)."""
    while node.op == "call_function" and node.target in VIEWS_OF_WEIGHT:
        node = node.args[0]
    return node.op == "placeholder" and node.name.startswith("p_")


def _matmul(node: fx.Node, placements: dict, tp: int) -> Decision:
    addmm = node.target is aten.addmm.default
    a, b = (node.args[1], node.args[2]) if addmm else (node.args[0], node.args[1])
    pa, pb = _pl(a, placements), _pl(b, placements)
    got = _mm(pa, pb)
    summed: dict[fx.Node, Any] = {}
    if got is None and isinstance(pa, Partial) != isinstance(pb, Partial):
        # a partial sum times a shard (a gradient summed over the ranks' heads, times a split
        # activation): sum it first (Megatron's backward all-reduce), then the shard's rule
        summed = {a: R} if isinstance(pa, Partial) else {b: R}
        got = _mm(R if a in summed else pa, R if b in summed else pb)
    if got is None and not (isinstance(pa, Partial) or isinstance(pb, Partial)):
        # an activation split where no rule uses it (tokens, under sequence parallelism): gather it,
        # never a weight; rather one whose
        # product is not a partial sum, then the smaller
        options = []
        for x, px in ((a, pa), (b, pb)):
            if isinstance(px, Shard) and not _is_weight(x):
                trial = _mm(R if x is a else pa, R if x is b else pb)
                if trial is not None:
                    options.append((isinstance(trial[0], Partial), x.meta["val"].numel(), x, trial))
        if options:
            _, _, x, got = min(options, key=lambda o: o[:2])
            summed = {x: R}
    if got is None:
        return replicate_all(node, placements)
    out, want = got
    want_nodes = {a: want["a"]} if "a" in want else dict(summed)
    want_nodes.update({x: w for x, w in summed.items() if x not in want_nodes})
    if "b" in want:
        want_nodes[b] = want["b"]
    if not addmm:
        return Decision(out, want_nodes)
    bias_pl = _pl(node.args[0], placements)
    if isinstance(out, Partial):  # bias must be added once, after the sum: all_reduce(a @ b) + bias
        if bias_pl != R:
            want_nodes[node.args[0]] = R
        rows, length = _shape(node)[0], _sequence.get()
        if length is not None and rows % length == 0:
            # sequence parallelism: reduce_scatter(a @ b) along the tokens + bias: (B*L, E) as S(0, B)
            return Decision(Shard(0, rows // length), want_nodes, decompose_addmm=True)
        return Decision(R, want_nodes, decompose_addmm=True)
    if isinstance(out, Shard) and out.dim == 1:
        if bias_pl != Shard(0, out.blocks):
            want_nodes[node.args[0]] = Shard(0, out.blocks)
        return Decision(out, want_nodes)
    if bias_pl != R:
        want_nodes[node.args[0]] = R
    return Decision(out, want_nodes)


def _sum(node: fx.Node, placements: dict, tp: int) -> Decision:
    src = node.args[0]
    p = _pl(src, placements)
    if p == R or isinstance(p, Partial):
        return Decision(p)
    if node.target is aten.sum.default:
        return Decision(P)
    dims, keep = _reduced_dims(node)  # [] and None: every dim
    if p.dim in dims:
        return Decision(P)
    shift = 0 if keep else sum(1 for d in dims if d < p.dim)
    return Decision(Shard(p.dim - shift, p.blocks))


def _reduced_dims(node: fx.Node) -> tuple[list[int], bool]:
    nd = node.args[0].meta["val"].dim()
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        dims = list(range(nd))  # amax(x, []) and mean(x, None) reduce every dim
    dims = [dims] if isinstance(dims, int) else dims
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return [d % nd for d in dims], bool(keep)


SOFTMAX = {aten._softmax.default, aten._safe_softmax.default, aten._log_softmax.default}
SOFTMAX_BACKWARD = {aten._softmax_backward_data.default, aten._log_softmax_backward_data.default}


def _reduce(node: fx.Node, placements: dict, tp: int) -> Decision:
    """mean, amax, amin, var_mean and softmax along dims other than the sharded one keep the shard
    (attention probabilities split by heads); along it they need the whole tensor. A mean of a
    partial sum is the partial sum of the means."""
    srcs = [node.args[0], node.args[1]] if node.target in SOFTMAX_BACKWARD else [node.args[0]]
    pls = [_pl(a, placements) for a in srcs]
    n_out = len(node.meta["val"]) if isinstance(node.meta["val"], (tuple, list)) else 0
    wrap = (lambda pl: tuple(pl for _ in range(n_out))) if n_out else (lambda pl: pl)
    if all(pl == R for pl in pls):
        return Decision(wrap(R))
    if node.target is aten.mean.dim and isinstance(pls[0], Partial):
        return Decision(P)
    shards = {pl for pl in pls if isinstance(pl, Shard)}
    if len(shards) != 1 or any(isinstance(pl, Partial) for pl in pls):
        return replicate_all(node, placements)
    p = shards.pop()
    nd = node.args[0].meta["val"].dim()
    if node.target in SOFTMAX or node.target in SOFTMAX_BACKWARD:
        dim = node.args[2 if node.target in SOFTMAX_BACKWARD else 1] % nd
        if dim == p.dim:
            return replicate_all(node, placements)
        return Decision(p, {a: p for a, pl in zip(srcs, pls) if pl != p})
    dims, keep = _reduced_dims(node)
    if p.dim in dims:
        return replicate_all(node, placements)
    out = Shard(p.dim - (0 if keep else sum(d < p.dim for d in dims)), p.blocks)
    return Decision(wrap(out))


def _bmm(node: fx.Node, placements: dict, tp: int) -> Decision:
    """(b, n, k) @ (b, k, m) with the batch split (heads folded into it): each rank its batches; the
    other splits as in mm (rows of a, columns of b, or the contracted dim: a partial sum)."""
    a, b = node.args[:2]
    pa, pb = _pl(a, placements), _pl(b, placements)
    on = lambda p, d: isinstance(p, Shard) and p.dim == d  # noqa: E731
    if pa == R and pb == R:
        return Decision(R)
    if on(pa, 0) or on(pb, 0):
        p = pa if on(pa, 0) else pb
        want = {x: p for x, px in ((a, pa), (b, pb)) if px != p}
        if all(px in (R, p) for px in (pa, pb)):
            return Decision(p, want)
        return replicate_all(node, placements)
    if on(pa, 2) and on(pb, 1) and pa.blocks == pb.blocks:
        return Decision(P)
    if on(pa, 1) and pb == R:
        return Decision(pa)
    if pa == R and on(pb, 2):
        return Decision(pb)
    if (isinstance(pa, Partial) and pb == R) or (pa == R and isinstance(pb, Partial)):
        return Decision(P)
    return replicate_all(node, placements)


def _layer_norm(node: fx.Node, placements: dict, tp: int) -> Decision:
    x = node.args[0]
    p = _pl(x, placements)
    normalized = len(node.args[1])
    if isinstance(p, Shard) and p.dim < x.meta["val"].dim() - normalized:
        want = {a: R for a in node.all_input_nodes if a is not x and _pl(a, placements) != R}
        return Decision((p, p, p), want)
    return replicate_all(node, placements)


def _layer_norm_backward(node: fx.Node, placements: dict, tp: int) -> Decision:
    """native_layer_norm_backward(grad, x, shape, mean, rstd, weight, bias, mask) on tokens split
    (sequence parallelism): the input gradient keeps the split, the weight and bias gradients are
    sums over this rank's tokens (partial sums)."""
    grad, x = node.args[:2]
    p = _pl(x, placements)
    normalized = len(node.args[2])
    nd = x.meta["val"].dim()
    if not (isinstance(p, Shard) and p.dim < nd - normalized):
        return replicate_all(node, placements)
    stats = [node.args[3], node.args[4]]
    want = {a: p for a in [grad, *stats] if isinstance(a, fx.Node) and _pl(a, placements) != p}
    want.update({a: R for a in node.args[5:7] if isinstance(a, fx.Node) and _pl(a, placements) != R})
    return Decision((p, P, P), want)


def _heads(node: fx.Node, placements: dict, tp: int) -> Decision:
    """Attention (any scaled-dot-product kernel, graphs.ops.Attention) with heads split (dim 1 of
    (B, H, L, D)) when an input carrying heads is split by heads (the others are then chunked). A mask broadcast over heads
    is kept whole, a per-head one (T5's position bias, ALiBi) is split with the heads; the mask's
    gradient (memory-efficient backward) is then split too, or, for a broadcast mask, a sum over
    every head: a partial sum on each rank."""
    layout = ops.attention(node.target)
    tensors = [node.args[i] for i in layout.heads_in if i < len(node.args) and isinstance(node.args[i], fx.Node)]
    pls = [_pl(a, placements) for a in tensors]
    if Shard(1) not in pls or any(p not in (R, Shard(1)) for p in pls):
        return replicate_all(node, placements)
    mask = layout.mask_arg(node)
    want = {a: R for a in node.all_input_nodes if a not in tensors and _pl(a, placements) != R}
    # keys and values computed whole (kv heads that do not divide tp): each rank takes its heads
    want.update({a: Shard(1) for a, p in zip(tensors, pls) if p == R})
    mask_out = R
    if isinstance(mask, fx.Node):
        shape = _shape(mask)
        per_head = len(shape) == 4 and shape[1] > 1
        want.pop(mask, None)
        if per_head and _pl(mask, placements) != Shard(1):
            want[mask] = Shard(1)
        elif not per_head and _pl(mask, placements) != R:
            want[mask] = R
        mask_out = Shard(1) if per_head else P
    heads = set(layout.heads_out)
    out = tuple(Shard(1) if i in heads else mask_out if i == layout.bias_grad else R for i in range(layout.n_out))
    return Decision(out, want)


def _vocab(op_rule: Callable[..., Any], fallback: Callable[..., Decision]) -> Callable[..., Decision]:
    """A vocab-parallel rule (passes/tp_vocab.py) where it applies, else `fallback`. Its tensor inputs
    other than the split ones must be whole (targets, ids, the incoming loss gradient)."""

    def rule(node: fx.Node, placements: dict, tp: int) -> Decision:
        got = op_rule(node, placements, tp)
        if got is None:
            return fallback(node, placements, tp)
        out, rewrite, split = got
        want = {a: R for a in node.all_input_nodes if a not in split and _pl(a, placements) != R}
        if isinstance(out, tuple):
            out = tuple(R for _ in out)
        return Decision(out, want, rewrite=rewrite)

    return rule


def _embedding(node: fx.Node, placements: dict, tp: int) -> Decision:
    weight, ids = node.args[:2]
    if _pl(ids, placements) == R:
        got = tp_vocab.embedding(node, _pl(weight, placements), tp)
        if got is not None:
            return Decision(got[0], rewrite=got[1])
    return replicate_all(node, placements)


def _log_softmax(node: fx.Node, placements: dict, tp: int) -> Decision:
    p = _pl(node.args[0], placements)
    got = tp_vocab.log_softmax(node, p, tp) if isinstance(p, Shard) else None
    return Decision(got[0], rewrite=got[1]) if got is not None else _reduce(node, placements, tp)


FAMILIES = {
    "pointwise": lambda n, pl, tp: _pointwise(n, pl),
    "view": _view,
    "permute": _permute,
    "split": _split,
    "cat": _cat,
    "unbind": _unbind,
    "stack": _stack,
    "getitem": _getitem,
    "matmul": _matmul,
    "sum": _sum,
    "layer_norm": _layer_norm,
    "replicate": lambda n, pl, tp: replicate_all(n, pl),
    "heads": _heads,
    "layer_norm_backward": _layer_norm_backward,
    "dims": _dims,
    "reduce": _reduce,
    "bmm": _bmm,
    "embedding": _embedding,
    "embedding_backward": _vocab(tp_vocab.embedding_backward, lambda n, pl, tp: replicate_all(n, pl)),
    "log_softmax": _log_softmax,
    "log_softmax_backward": _vocab(tp_vocab.log_softmax_backward, _reduce),
    "nll_loss": _vocab(tp_vocab.nll_loss, lambda n, pl, tp: replicate_all(n, pl)),
    "nll_loss_backward": _vocab(tp_vocab.nll_loss_backward, lambda n, pl, tp: replicate_all(n, pl)),
}
RULES = {op: FAMILIES[f.tp] for op, f in ops.OPS.items() if f.tp is not None}  # op -> rule, from graphs/ops.py


def propagate(
    program: DistProgram, params: dict[fx.Node, Any], tp: int, sequence: int | None = None
) -> tuple[dict, dict]:
    """Placements of every node and the decisions that produced them (no graph changes).
    `sequence`: the sequence length, for sequence parallelism (None: off)."""
    token = _sequence.set(sequence)
    try:
        return _propagate(program, params, tp)
    finally:
        _sequence.reset(token)


def _propagate(program: DistProgram, params: dict[fx.Node, Any], tp: int) -> tuple[dict, dict]:
    placements: dict[fx.Node, Any] = dict(params)
    decisions: dict[fx.Node, Decision] = {}
    for node in program.graph.nodes:
        if node.op == "placeholder":
            placements.setdefault(node, R)
            continue
        if node.op != "call_function":
            continue
        rule = RULES.get(node.target)
        if rule is None:
            decision = replicate_all(node, placements)
        else:
            decision = rule(node, placements, tp)
        decisions[node] = decision
        placements[node] = decision.out
    return placements, decisions
