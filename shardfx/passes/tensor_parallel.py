"""tensor_parallel: split Linear layers across the "tp" ranks (Megatron-LM style) by propagating placements.

1. A plan gives every Linear a style: "colwise" (weight rows split: each rank
   computes a slice of the output features), "rowwise" (weight columns split:
   each rank computes a partial sum of the output) or "replicate".
   - auto: a Linear whose output reaches another Linear's input through
     element-wise, view, split and attention ops only is colwise, the other
     rowwise (attention qkv -> proj, MLP fc -> proj). A colwise output split
     into k equal parts (a fused q|k|v) is sharded per part (blocks=k). A pair
     whose sizes do not divide (heads, features) is left replicated, and the
     plan says so; it never fails on sizes.
   - user: {module pattern: style} (fnmatch); a split that cannot be made is
     an error naming the module and the sizes.
2. Placements (R replicated, S(dim) sharded, P partial sum) propagate through
   the forward and backward graph in order, one rule per op (RULES). A rule
   returns the output placement and the input placements it needs; where an
   input differs, a redistribution is inserted: P->R all_reduce, S->R
   all_gather, R->S a local chunk (free). Ops without a rule get replicated
   inputs (correct, maybe slow); they are reported once by name.
3. Shapes in size arguments (view, split) are rewritten to the local sizes
   and every `val` is recomputed, so the program is checked shape by shape.

Megatron's count follows from the rules: per block, the rowwise outputs are
partial sums (2 all-reduces in forward) and the colwise input gradients are
partial sums (2 all-reduces in backward).
Needs: capture. Provides: program.tp_specs, meta[PLACEMENT]["tp"].
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from shardfx.graphs import meta, ops
from shardfx.graphs.placement import Partial, Shard, ShardSpec
from shardfx.graphs.program import DistProgram
from shardfx.graphs.rewrite import refresh_val
from shardfx.graphs.signature import GRAD, PARAM
from shardfx.passes.manager import PassContext, PassResult
from shardfx.passes.tp_rules import POINTWISE, RULES, Decision, R, replicate_all

aten = torch.ops.aten
ORIGIN = "tensor_parallel"
STYLES = ("colwise", "rowwise", "replicate")


@dataclass
class Linear:
    module: str
    weight: fx.Node  # the parameter placeholder (out_features, in_features)
    bias: fx.Node | None
    matmul: fx.Node  # the forward mm/addmm
    blocks: int = 1
    partner: Linear | None = None

    @property
    def out_features(self) -> int:
        return self.weight.meta["val"].shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.meta["val"].shape[1]


# ---------------------------------------------------------------- the plan


def find_linears(program: DistProgram) -> list[Linear]:
    """Forward mm/addmm nodes whose weight operand is t(a 2-D parameter): the model's Linear layers."""
    names = {n: s.name for s, n in zip(program.signature.inputs, program.placeholders()) if s.role == PARAM}
    found: dict[fx.Node, Linear] = {}
    for node in program.graph.nodes:
        if node.op != "call_function" or meta.phase(node) != meta.FORWARD:
            continue
        if node.target not in (aten.mm.default, aten.addmm.default):
            continue
        w_t = node.args[2] if node.target is aten.addmm.default else node.args[1]
        if not (isinstance(w_t, fx.Node) and w_t.target is aten.t.default and w_t.args[0] in names):
            continue
        weight = w_t.args[0]
        if weight in found or weight.meta["val"].dim() != 2:
            continue  # a tied weight used twice stays replicated (its second use is e.g. an embedding)
        bias = node.args[0] if node.target is aten.addmm.default and node.args[0] in names else None
        module = names[weight].rsplit(".", 1)[0]
        found[weight] = Linear(module, weight, bias, node)
    linears = list(found.values())
    tied = {w for w in found if any(u.target is aten.embedding.default for u in w.users)}
    return [lin for lin in linears if lin.weight not in tied]


# Ops a colwise output passes through on its way to the rowwise Linear it pairs with.
FRIENDLY = (
    POINTWISE
    | ops.with_tp_rule("view")
    | ops.with_tp_rule("split")
    | ops.with_tp_rule("getitem")
    | {aten.transpose.int, aten.permute.default}
    | {op for op in ops.of_kind(ops.ATTENTION) if not ops.attention(op).backward}
)


def _pair(lin: Linear, by_matmul: dict[fx.Node, Linear]) -> None:
    """Walk forward from a Linear's output through friendly ops; reaching another Linear's input pairs them."""
    frontier, seen = [lin.matmul], {lin.matmul}
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen or meta.phase(user) != meta.FORWARD:
                continue
            seen.add(user)
            other = by_matmul.get(user)
            if other is not None and other is not lin:
                a = user.args[1] if user.target is aten.addmm.default else user.args[0]
                if a is node and lin.partner is None and other.partner is None:
                    lin.partner, other.partner = other, lin
                continue
            if user.target is aten.split.Tensor and user.args[0] is node:
                lin.blocks = max(lin.blocks, len(user.meta["val"]))
            if user.target in FRIENDLY:
                frontier.append(user)


def auto_plan(linears: list[Linear], tp: int, demoted: set[str]) -> dict[str, str]:
    by_matmul = {lin.matmul: lin for lin in linears}
    for lin in linears:
        lin.partner, lin.blocks = None, 1
    for lin in linears:
        if lin.partner is None:
            _pair(lin, by_matmul)
    plan: dict[str, str] = {}
    for lin in linears:
        plan[lin.module] = "replicate"
        partner = lin.partner
        if partner is None or lin.module in demoted:
            continue
        col, row = (lin, partner) if _comes_first(lin, partner) else (partner, lin)
        fits = col.out_features % (tp * col.blocks) == 0 and row.in_features % tp == 0
        if fits:
            plan[lin.module] = "colwise" if lin is col else "rowwise"
    return plan


def _comes_first(a: Linear, b: Linear) -> bool:
    for node in a.matmul.graph.nodes:
        if node is a.matmul:
            return True
        if node is b.matmul:
            return False
    return True


def user_plan(linears: list[Linear], patterns: dict[str, str], tp: int) -> dict[str, str]:
    for style in patterns.values():
        if style not in STYLES:
            raise ValueError(f"tensor-parallel style {style!r} is not one of {list(STYLES)}")
    plan = {}
    by_matmul = {lin.matmul: lin for lin in linears}
    for lin in linears:
        _pair(lin, by_matmul)  # detects fused q|k|v (blocks)
        style = next((s for pat, s in patterns.items() if fnmatch.fnmatch(lin.module, pat)), "replicate")
        if style == "colwise" and lin.out_features % (tp * lin.blocks):
            raise ValueError(
                f"{lin.module}: colwise needs out_features {lin.out_features} divisible by tp={tp}"
                + (f" in each of its {lin.blocks} parts" if lin.blocks > 1 else "")
            )
        if style == "rowwise" and lin.in_features % tp:
            raise ValueError(f"{lin.module}: rowwise needs in_features {lin.in_features} divisible by tp={tp}")
        plan[lin.module] = style
    return plan


# ---------------------------------------------------------------- propagation


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


# ---------------------------------------------------------------- the pass


def tensor_parallel(
    program: DistProgram, ctx: PassContext, *, axis: str = "tp", plan: dict[str, str] | None = None
) -> PassResult:
    tp = program.mesh.size(axis)
    linears = find_linears(program)
    demoted: set[str] = set()
    while True:
        styles = auto_plan(linears, tp, demoted) if plan is None else user_plan(linears, plan, tp)
        params = _param_placements(linears, styles)
        placements, decisions = propagate(program, params, tp)
        gathers = [
            n
            for n, d in decisions.items()
            if any(isinstance(placements.get(i, R), Shard) and w == R for i, w in d.want.items())
        ]
        if plan is not None or not gathers:
            break
        # auto: a pair whose shards had to be gathered back (sizes that do not divide) stays replicated
        culprit = _nearest_pair(gathers[0], linears, styles)
        if culprit is None:
            break
        demoted.update({culprit.module, culprit.partner.module})
    fallbacks = sorted({str(n.target) for n, d in decisions.items() if d.fallback})
    stats = _apply(program, linears, styles, placements, decisions, axis, tp)
    stats.update(
        plan={k: v for k, v in styles.items()},
        left_replicated=sorted(demoted),
        fallback_ops=fallbacks,
    )
    if fallbacks:
        ctx.log(f"tensor_parallel: ops without a rule ran replicated: {', '.join(fallbacks)}")
    if demoted:
        ctx.log(f"tensor_parallel: left replicated (sizes do not divide by tp={tp}): {', '.join(sorted(demoted))}")
    return PassResult(program, stats)


def _param_placements(linears: list[Linear], styles: dict[str, str]) -> dict[fx.Node, Any]:
    out: dict[fx.Node, Any] = {}
    for lin in linears:
        style = styles.get(lin.module, "replicate")
        if style == "colwise":
            out[lin.weight] = Shard(0, lin.blocks)
            if lin.bias is not None:
                out[lin.bias] = Shard(0, lin.blocks)
        elif style == "rowwise":
            out[lin.weight] = Shard(1)
    return out


def _nearest_pair(node: fx.Node, linears: list[Linear], styles: dict[str, str]) -> Linear | None:
    module = node.meta.get(meta.MODULE, "")
    best, best_len = None, -1
    for lin in linears:
        if styles.get(lin.module) == "colwise":
            prefix = _common_prefix(module, lin.module)
            if prefix > best_len:
                best, best_len = lin, prefix
    return best


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        n += 1
    return n


def _apply(
    program: DistProgram,
    linears: list[Linear],
    styles: dict[str, str],
    placements: dict,
    decisions: dict,
    axis: str,
    tp: int,
) -> dict[str, Any]:
    graph = program.graph
    names = {n: s.name for s, n in zip(program.signature.inputs, program.placeholders())}
    n_all_reduce = n_gather = 0
    # parameters become this rank's slices
    for node, p in list(placements.items()):
        if node.op == "placeholder" and isinstance(p, Shard):
            full = node.meta["val"]
            spec = ShardSpec(axis, p.dim, tp, tuple(full.shape), blocks=p.blocks)
            program.tp_specs[names[node]] = spec
            node.meta.setdefault(meta.PLACEMENT, {})[axis] = p
    # redistributions and shape rewrites, in graph order
    for node in list(graph.nodes):
        decision = decisions.get(node)
        if decision is None:
            continue
        for inp, want in decision.want.items():
            have = placements.get(inp, R)
            if want == have:
                continue
            with graph.inserting_before(node):
                new, moved = _redistribute(program, inp, have, want, axis, node)
            n_all_reduce += moved == "all_reduce"
            n_gather += moved == "all_gather"
            node.replace_input_with(inp, new)
        if decision.decompose_addmm:
            n_all_reduce += 1
            _decompose(program, node, axis)
            continue
        _rewrite_sizes(node, placements, tp)
        out = decision.out
        if not isinstance(out, tuple) and out != R:
            node.meta.setdefault(meta.PLACEMENT, {})[axis] = out
    # outputs: gradients in their parameter's placement, everything else replicated
    outputs = program.outputs()
    for i, spec in enumerate(program.signature.outputs):
        value = outputs[i]
        have = placements.get(value, R)
        want = R
        if spec.role == GRAD:
            want = placements.get(program.placeholders()[program.signature.input_index(PARAM, spec.target)], R)
        if have != want:
            with graph.inserting_before(program.output_node()):
                outputs[i], moved = _redistribute(program, value, have, want, axis, value)
            n_all_reduce += moved == "all_reduce"
            n_gather += moved == "all_gather"
    program.set_outputs(outputs)
    _refresh_all(program, tp)
    return {"tp_all_reduces": n_all_reduce, "tp_all_gathers": n_gather}


def _tag(node: fx.Node) -> fx.Node:
    node.meta[meta.ROLE] = meta.TP_REDISTRIBUTE
    return node


def _call(program: DistProgram, target: Any, args: tuple, at: fx.Node, kwargs: dict | None = None) -> fx.Node:
    """A new node at the insertion point; its `val` comes from _refresh_all once all shapes are local."""
    node = program.graph.call_function(target, args, kwargs or {})
    meta.copy_provenance(at, node, ORIGIN)
    return node


def _redistribute(
    program: DistProgram, x: fx.Node, have: Any, want: Any, axis: str, at: fx.Node
) -> tuple[fx.Node, str]:
    """Insert (at the current point) what turns placement `have` into `want`."""
    moved = ""
    if isinstance(have, Partial):
        x = _tag(_call(program, torch.ops.shardfx.all_reduce.default, (x, axis, "sum"), at))
        have, moved = R, "all_reduce"
    if isinstance(have, Shard) and have != want:
        x = _gather(program, x, have, axis, at)
        have, moved = R, moved or "all_gather"
    if isinstance(want, Shard) and have == R:
        x = _call(program, torch.ops.shardfx.chunk.default, (x, axis, want.dim, want.blocks), at)
    return x, moved


def _gather(program: DistProgram, x: fx.Node, have: Shard, axis: str, at: fx.Node) -> fx.Node:
    tp = program.mesh.size(axis)
    g = _tag(_call(program, torch.ops.shardfx.all_gather.default, (x, axis, have.dim), at))
    if have.blocks == 1:
        return g
    # gathered as [rank0: b0 b1 .., rank1: b0 b1 ..] along dim; reorder to [b0: rank0 rank1 .., b1: ..]
    shape = list(x.meta["val"].shape)  # still the global shape: vals are made local at the end
    d = have.dim
    split = shape[:d] + [tp, have.blocks, shape[d] // (tp * have.blocks)] + shape[d + 1 :]
    v = _call(program, aten.view.default, (g, split), at)
    t = _call(program, aten.transpose.int, (v, d, d + 1), at)
    c = _call(program, aten.clone.default, (t,), at, {"memory_format": torch.contiguous_format})
    return _call(program, aten.view.default, (c, shape), at)


def _decompose(program: DistProgram, node: fx.Node, axis: str) -> None:
    """addmm(bias, a, b) with a partial-sum product: all_reduce(a @ b) + bias (bias added once)."""
    bias, a, b = node.args[:3]
    with program.graph.inserting_before(node):
        mm = program.graph.call_function(aten.mm.default, (a, b))
        mm.meta = {k: v for k, v in node.meta.items() if k != meta.PLACEMENT}
        summed = _tag(program.graph.call_function(torch.ops.shardfx.all_reduce.default, (mm, axis, "sum")))
        summed.meta = dict(mm.meta)
        summed.meta[meta.ORIGIN] = ORIGIN
        summed.meta[meta.ROLE] = meta.TP_REDISTRIBUTE
        out = program.graph.call_function(aten.add.Tensor, (summed, bias))
        out.meta = dict(mm.meta)
        out.meta[meta.ORIGIN] = ORIGIN
    node.replace_all_uses_with(out)
    program.graph.erase_node(node)


def _local_shape(node: fx.Node, p: Any, tp: int) -> list[int]:
    shape = list(node.meta["val"].shape)
    if isinstance(p, Shard):
        shape[p.dim] //= tp
    return shape


def _rewrite_sizes(node: fx.Node, placements: dict, tp: int) -> None:
    """Size arguments hold global sizes: give sharded outputs their local ones."""
    p = placements.get(node, R)
    if node.target in (aten.view.default, aten._unsafe_view.default, aten.reshape.default):
        if isinstance(p, Shard):
            node.args = (node.args[0], _local_shape(node, p, tp), *node.args[2:])
    elif node.target is aten.split.Tensor:
        src_p = placements.get(node.args[0], R)
        dim = (node.args[2] if len(node.args) > 2 else 0) % node.args[0].meta["val"].dim()
        if isinstance(src_p, Shard) and src_p.dim == dim:
            node.args = (node.args[0], node.args[1] // tp, *node.args[2:])


def _refresh_all(program: DistProgram, tp: int) -> None:
    """Recompute every `val` at local shapes (placeholders from their tp ShardSpec)."""
    names = {n: s.name for s, n in zip(program.signature.inputs, program.placeholders())}
    for node in program.graph.nodes:
        if node.op == "placeholder":
            spec = program.tp_specs.get(names[node])
            if spec is not None:
                val = node.meta["val"]
                with program.fake_mode:
                    node.meta["val"] = torch.empty(spec.shard_shape, dtype=val.dtype, device=val.device)
        elif node.op == "call_function":
            refresh_val(program, node)
