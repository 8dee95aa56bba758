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

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from shardfx.graphs import ops
from shardfx.graphs.placement import Partial, Replicate, Shard
from shardfx.graphs.program import DistProgram

aten = torch.ops.aten
R = Replicate()
P = Partial()


@dataclass
class Decision:
    out: Any  # a placement, or a tuple of them for multi-output ops
    want: dict[fx.Node, Any] = field(default_factory=dict)  # inputs that must be redistributed first
    fallback: bool = False  # the op has no rule: inputs made replicated
    decompose_addmm: bool = False  # rowwise addmm: all_reduce(mm) + bias


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
    aten.alias.default, aten._to_copy.default,
}  # fmt: skip


def _pointwise(node: fx.Node, placements: dict) -> Decision:
    out_nd = node.meta["val"].dim()
    tensors = node.all_input_nodes
    pls = [_pl(a, placements) for a in tensors]
    partial = [a for a, p in zip(tensors, pls) if isinstance(p, Partial)]
    if partial:
        linear = node.target in LINEAR_IN_P and all(isinstance(p, Partial) for p in pls)
        linear |= (
            node.target in (aten.mul.Tensor, aten.div.Tensor)
            and len(partial) == 1
            and (node.target is aten.mul.Tensor or node.args[0] is partial[0])
            and all(p == R for a, p in zip(tensors, pls) if a is not partial[0])
        )
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


def _view(node: fx.Node, placements: dict, tp: int) -> Decision:
    src = node.args[0]
    p = _pl(src, placements)
    if p == R or isinstance(p, Partial):
        return Decision(p)
    src_shape, out_shape = _shape(src), _shape(node)
    for ga, gb in _groups(src_shape, out_shape) or []:
        if p.dim not in ga:
            continue
        # the shard must be the outermost real (size > 1) dim of its group on both sides
        ga_real = [k for k in ga if src_shape[k] != 1]
        gb_real = [k for k in gb if out_shape[k] != 1]
        if not ga_real or ga_real[0] != p.dim or not gb_real:
            break
        target = gb_real[0]
        fits = out_shape[target] % (tp * p.blocks) == 0
        if fits and (p.blocks == 1 or (len(ga_real) == 1 and len(gb_real) == 1)):
            return Decision(Shard(target, p.blocks))
        break
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
    src, size = node.args[0], node.args[1]
    dim = (node.args[2] if len(node.args) > 2 else 0) % src.meta["val"].dim()
    p = _pl(src, placements)
    n_out = len(node.meta["val"])
    if p == R or isinstance(p, Partial):
        return Decision(tuple(p for _ in range(n_out)))
    if p.dim != dim:
        return Decision(tuple(p for _ in range(n_out)))
    if p.blocks == n_out and _shape(src)[dim] == size * n_out and size % tp == 0:
        return Decision(tuple(Shard(dim) for _ in range(n_out)))
    return replicate_all(node, placements)


def _cat(node: fx.Node, placements: dict, tp: int) -> Decision:
    """cat of k slices sharded along the cat dim is that dim in k blocks (the inverse of split)."""
    parts = node.args[0]
    dim = (node.args[1] if len(node.args) > 1 else 0) % node.meta["val"].dim()
    pls = [_pl(a, placements) for a in parts]
    if all(p == R for p in pls):
        return Decision(R)
    if all(isinstance(p, Partial) for p in pls):
        return Decision(P)
    if all(isinstance(p, Shard) and p.blocks == 1 and p.dim == pls[0].dim for p in pls):
        if pls[0].dim == dim:
            return Decision(Shard(dim, len(parts)))
        return Decision(pls[0])
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


def _matmul(node: fx.Node, placements: dict, tp: int) -> Decision:
    addmm = node.target is aten.addmm.default
    a, b = (node.args[1], node.args[2]) if addmm else (node.args[0], node.args[1])
    got = _mm(_pl(a, placements), _pl(b, placements))
    if got is None:
        return replicate_all(node, placements)
    out, want = got
    want_nodes = {a: want["a"]} if "a" in want else {}
    if "b" in want:
        want_nodes[b] = want["b"]
    if not addmm:
        return Decision(out, want_nodes)
    bias_pl = _pl(node.args[0], placements)
    if isinstance(out, Partial):  # bias must be added once, after the sum: all_reduce(a @ b) + bias
        if bias_pl != R:
            want_nodes[node.args[0]] = R
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
    nd = src.meta["val"].dim()
    if node.target is aten.sum.default:
        return Decision(P)
    dims = [d % nd for d in node.args[1]]
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if p.dim in dims:
        return Decision(P)
    shift = 0 if keep else sum(1 for d in dims if d < p.dim)
    return Decision(Shard(p.dim - shift, p.blocks))


def _layer_norm(node: fx.Node, placements: dict, tp: int) -> Decision:
    x = node.args[0]
    p = _pl(x, placements)
    normalized = len(node.args[1])
    if isinstance(p, Shard) and p.dim < x.meta["val"].dim() - normalized:
        want = {a: R for a in node.all_input_nodes if a is not x and _pl(a, placements) != R}
        return Decision((p, p, p), want)
    return replicate_all(node, placements)


def _heads(node: fx.Node, placements: dict, tp: int) -> Decision:
    """Attention (any scaled-dot-product kernel, graphs.ops.Attention) with heads split (dim 1 of
    (B, H, L, D)) when every input carrying heads is split by heads; a mask or bias is kept whole."""
    layout = ops.attention(node.target)
    tensors = [node.args[i] for i in layout.heads_in if i < len(node.args) and isinstance(node.args[i], fx.Node)]
    mask = layout.mask_arg(node)
    per_head = isinstance(mask, fx.Node) and mask.meta["val"].dim() == 4 and mask.meta["val"].shape[1] > 1
    if per_head or (isinstance(mask, fx.Node) and layout.bias_grad is not None):
        # a per-head mask would need splitting too, and a mask's gradient is a sum over every head
        # (a partial sum on each rank): no rule for either yet, the op runs whole
        return replicate_all(node, placements)
    if all(_pl(a, placements) == Shard(1) for a in tensors):
        others = {a: R for a in node.all_input_nodes if a not in tensors and _pl(a, placements) != R}
        heads = set(layout.heads_out)
        return Decision(tuple(Shard(1) if i in heads else R for i in range(layout.n_out)), others)
    return replicate_all(node, placements)


FAMILIES = {
    "pointwise": lambda n, pl, tp: _pointwise(n, pl),
    "view": _view,
    "permute": _permute,
    "split": _split,
    "cat": _cat,
    "getitem": _getitem,
    "matmul": _matmul,
    "sum": _sum,
    "layer_norm": _layer_norm,
    "replicate": lambda n, pl, tp: replicate_all(n, pl),
    "heads": _heads,
}
RULES = {op: FAMILIES[f.tp] for op, f in ops.OPS.items() if f.tp is not None}  # op -> rule, from graphs/ops.py


def propagate(program: DistProgram, params: dict[fx.Node, Any], tp: int) -> tuple[dict, dict]:
    """Placements of every node and the decisions that produced them (no graph changes)."""
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
