"""tensor_parallel: split Linear layers across the "tp" ranks (Megatron-LM style) by propagating placements.

1. A plan (passes/tp_plan.py) gives every Linear a style: "colwise" (output
   features split), "rowwise" (input features split: each rank computes a
   partial sum) or "replicate".
   - auto: Megatron's groups (one rowwise Linear and the colwise ones feeding
     it inside its module: q, k, v -> o; gate, up -> down), fused q|k|v split
     per part (blocks=k), the vocab (embedding, head, cross-entropy) split by
     rows (passes/tp_vocab.py). A group whose sizes do not divide, or whose
     split the rules had to gather back in the forward, stays replicated, and
     the reason is recorded per Linear; it never fails on sizes.
   - user: {module pattern: style} (fnmatch); a pattern matching nothing or a
     split that cannot be made is an error naming the pattern or the module.
2. Placements (R replicated, S(dim) sharded, P partial sum) propagate through
   the forward and backward graph in order, one rule per op (tp_rules.RULES,
   from the op table graphs/ops.py). Where an input's placement differs from
   what a rule needs, a redistribution is inserted (passes/redistribute.py):
   P->R all_reduce, S->R all_gather, R->S a local chunk (free), P->S
   reduce_scatter (sequence parallelism). A rule may also rewrite its op into
   local ops (the vocab-parallel ones). Ops without a rule get whole inputs
   (correct, maybe slow); they are reported once by name.
3. Size arguments (view, expand, split) are rewritten to the local sizes and
   every `val` is recomputed, so the program is checked shape by shape.

Megatron's count follows from the rules: per block, the rowwise outputs are
partial sums (2 all-reduces in forward) and the colwise input gradients are
partial sums (2 all-reduces in backward); under sequence parallelism each is
a reduce-scatter along the sequence and an all-gather before the next group.
Needs: capture. Provides: program.tp_specs, meta[PLACEMENT]["tp"].
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from shardfx.graphs import meta
from shardfx.graphs.placement import Shard, ShardSpec
from shardfx.graphs.program import DistProgram
from shardfx.graphs.rewrite import refresh_val
from shardfx.graphs.signature import GRAD, INPUT, PARAM
from shardfx.passes import redistribute
from shardfx.passes.manager import PassContext, PassResult
from shardfx.passes.tp_plan import (
    RESHAPES,
    Linear,
    auto_plan,
    culprits,
    find_linears,
    find_vocab,
    param_placements,
    user_plan,
)
from shardfx.passes.tp_rules import RULES, R, propagate

aten = torch.ops.aten
ORIGIN = "tensor_parallel"


def tensor_parallel(
    program: DistProgram,
    ctx: PassContext,
    *,
    axis: str = "tp",
    plan: dict[str, str] | None = None,
    sequence: bool = False,
) -> PassResult:
    tp = program.mesh.size(axis)
    linears = find_linears(program)
    demoted: dict[str, str] = {}  # group row -> why it stays replicated
    vocab, vocab_why = find_vocab(program, tp) if plan is None else (None, "a user tp_plan")
    while True:
        chosen = auto_plan(linears, tp, demoted) if plan is None else user_plan(linears, plan, tp)
        params = param_placements(linears, chosen.styles)
        if vocab is not None:
            params.update(vocab.placements())
        placements, decisions = propagate(program, params, tp)
        gathers = [
            n
            for n, d in decisions.items()
            if meta.phase(n) == meta.FORWARD
            and any(isinstance(placements.get(i, R), Shard) and w == R for i, w in d.want.items())
        ]
        if plan is not None or not gathers:
            break
        # auto: a group whose shard the rules could not carry to its rowwise input stays replicated
        modules = culprits(gathers[0], chosen, linears, placements)
        if not modules and vocab is not None:  # the loss could not stay split: a whole vocab
            vocab, vocab_why = None, _why_gathered(gathers[0])
            continue
        if not modules:
            break
        demoted.update({m: _why_gathered(gathers[0]) for m in modules})
    length, sequence_why = _sequence_length(program, tp) if sequence else (None, "off")
    if length is not None:  # the same plan, the stream between the blocks split along the sequence
        placements, decisions = propagate(program, params, tp, sequence=length)
    if vocab is not None:
        if vocab.head is not None:
            chosen.styles[vocab.head_module] = "colwise"
        chosen.reasons[vocab.head_module] = (
            f"colwise: vocab-parallel head, {vocab.size} classes split, parallel cross-entropy"
        )
    fallbacks = sorted({str(n.target) for n, d in decisions.items() if d.fallback})
    stats = _apply(program, linears, chosen.styles, placements, decisions, axis, tp)
    split = [lin for lin in linears if chosen.styles[lin.module] != "replicate"]
    total = sum(lin.nbytes for lin in linears)
    stats.update(
        plan=dict(chosen.styles),
        reasons=dict(chosen.reasons),
        left_replicated=sorted(
            m
            for g in chosen.groups
            if g.row.module in demoted
            for m in (g.row.module,) + tuple(c.module for c in g.cols)
        ),
        fallback_ops=fallbacks,
        split_linears=len(split),
        linears=len(linears),
        split_fraction=round(sum(lin.nbytes for lin in split) / total, 4) if total else 0.0,
        vocab_parallel=vocab.size if vocab is not None else None,
        vocab_reason=vocab_why,
        layers=_layers(program, linears, chosen, vocab),
        sequence_parallel=length,
        sequence_reason=sequence_why,
    )
    if sequence:
        ctx.log(
            f"tensor_parallel: sequence parallel over {length} tokens"
            if length is not None
            else f"tensor_parallel: sequence parallelism off: {sequence_why}"
        )
    ctx.log(
        f"tensor_parallel: {len(split)} of {len(linears)} Linear layers split "
        f"({stats['split_fraction']:.0%} of their bytes)"
    )
    ctx.log(
        f"tensor_parallel: vocab-parallel embedding, head and cross-entropy ({vocab.size} classes)"
        if vocab is not None
        else f"tensor_parallel: vocab not split: {vocab_why}"
    )
    if fallbacks:
        ctx.log(f"tensor_parallel: ops without a rule ran on whole tensors: {', '.join(fallbacks)}")
    for lin in linears:
        if chosen.styles[lin.module] == "replicate" and plan is None:
            ctx.log(f"tensor_parallel: {lin.module} {chosen.reasons[lin.module]}")
    return PassResult(program, stats)


def _layers(program: DistProgram, linears: list[Linear], chosen: Any, vocab: Any) -> list[dict[str, Any]]:
    """One row per Linear (and the vocab's embeddings): style, full and per-rank weight bytes, reason."""
    names = {n: s.name for s, n in zip(program.signature.inputs, program.placeholders())}
    rows = []
    weights = [(lin.module, lin.weight) for lin in linears]
    if vocab is not None:
        weights += [(names[w].rsplit(".", 1)[0], w) for w in vocab.embeddings if all(w is not x for _, x in weights)]
    for module, weight in weights:
        val = weight.meta["val"]  # local by now
        spec = program.tp_specs.get(names[weight])
        full = math.prod(spec.full_shape) if spec is not None else val.numel()
        rank = val.numel()
        style = (
            "vocab" if vocab is not None and weight in vocab.placements() else chosen.styles.get(module, "replicate")
        )
        reason = chosen.reasons.get(module, "vocab-parallel embedding" if spec is not None else "")
        rows.append(
            {
                "module": module,
                "style": style,
                "bytes": full * val.element_size(),
                "rank_bytes": rank * val.element_size(),
                "reason": reason,
            }
        )
    return rows


REVIEWS = RESHAPES | {aten.t.default, aten.transpose.int}  # ops a gather can be moved above


def _reshaped_from(node: fx.Node, placements: dict) -> tuple[fx.Node, list[fx.Node]] | None:
    """(the split tensor `node` is made from through reshapes and transposes only, those ops from it
    outwards) when that tensor is split along a plain dim (no blocks); None otherwise."""
    chain: list[fx.Node] = []
    while node.op == "call_function" and node.target in REVIEWS and isinstance(placements.get(node.args[0]), Shard):
        chain.append(node)
        node = node.args[0]
    root = placements.get(node)
    return (node, chain[::-1]) if chain and isinstance(root, Shard) and root.blocks == 1 else None


def _reapply(make: redistribute.Make, whole: fx.Node, chain: list[fx.Node]) -> fx.Node:
    """The ops of `chain` again on the whole tensor (sizes: the global ones, from each node's val)."""
    for op in chain:
        if op.target in (aten.t.default, aten.transpose.int):
            whole = make(op.target, (whole, *op.args[1:]))
        else:
            whole = make(op.target, (whole, list(op.meta["val"].shape)))
    return whole


def _sequence_length(program: DistProgram, tp: int) -> tuple[int | None, str]:
    """The sequence length L of the batch (dim 1 of its first input of 2 or more dims), if it divides by tp."""
    for spec, node in zip(program.signature.inputs, program.placeholders()):
        val = node.meta.get("val")
        if spec.role == INPUT and hasattr(val, "shape") and val.dim() >= 2:
            length = val.shape[1]
            if length % tp:
                return None, f"the sequence length {length} does not divide by tp={tp}"
            return length, ""
    return None, "no batch input has a sequence dim (B, L, ...)"


def _why_gathered(node: fx.Node) -> str:
    where = f"node {node.name} in {node.meta.get(meta.MODULE) or 'the model'}"
    if node.target not in RULES:
        return f"{node.target} has no tensor-parallel rule ({where}); its input had to be gathered"
    shapes = [tuple(a.meta["val"].shape) for a in node.all_input_nodes if hasattr(a.meta.get("val"), "shape")]
    if node.target in RESHAPES:
        out = tuple(node.meta["val"].shape)
        return (
            f"the reshape {shapes[0]} -> {out} at {where} cuts the split features into parts "
            f"(heads) that do not divide by tp; it was gathered"
        )
    return f"{node.target} cannot keep the split at {where} (input shapes {shapes}); it was gathered"


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
    n_all_reduce = n_gather = n_scatter = 0
    # parameters become this rank's slices
    for node, p in list(placements.items()):
        if node.op == "placeholder" and isinstance(p, Shard):
            full = node.meta["val"]
            spec = ShardSpec(axis, p.dim, tp, tuple(full.shape), blocks=p.blocks)
            program.tp_specs[names[node]] = spec
            node.meta.setdefault(meta.PLACEMENT, {})[axis] = p
    # redistributions and shape rewrites, in graph order
    moved_to: dict[tuple[fx.Node, Any, str], fx.Node] = {}
    renamed: dict[fx.Node, fx.Node] = {}  # a node replaced by a vocab-parallel rule -> what replaced it
    for node in list(graph.nodes):
        decision = decisions.get(node)
        if decision is None or node in renamed:
            continue
        for inp, want in decision.want.items():
            inp = renamed.get(inp, inp)
            have = placements.get(inp, R)
            if want == have:
                continue
            # the backward gathers again (nothing whole is saved for it); sums are shared
            key = (inp, want, meta.phase(node) if isinstance(have, Shard) else "")
            new = moved_to.get(key)
            found = _reshaped_from(inp, placements) if want == R and isinstance(have, Shard) else None
            if new is None and found is not None:
                # a reshape of a split tensor gathered: gather the tensor once (one all-gather for
                # q, k and v, and for a gradient and its transpose, under sequence parallelism)
                root, chain = found
                whole = moved_to.get((root, R, meta.phase(node)))
                if whole is None:
                    with graph.inserting_before(node):
                        whole, moved = _redistribute(program, root, placements[root], R, axis, node)
                    moved_to[(root, R, meta.phase(node))] = whole
                    n_gather += moved == "all_gather"
                with graph.inserting_before(node):
                    new = _reapply(_maker(program, node), whole, chain)
                moved_to[key] = new
            if new is None:  # one redistribution per value and placement, shared by its users
                with graph.inserting_before(node):
                    new, moved = _redistribute(program, inp, have, want, axis, node)
                moved_to[key] = new
                n_all_reduce += moved == "all_reduce"
                n_gather += moved == "all_gather"
                n_scatter += moved == "reduce_scatter"
            node.replace_input_with(inp, new)
        if decision.decompose_addmm:
            n_all_reduce += 1
            made = _decompose(program, node, axis, decision.out, tp)
            placements[made] = decision.out
            renamed[node] = made
            if isinstance(decision.out, Shard):
                n_all_reduce -= 1
                n_scatter += 1
            continue
        if decision.rewrite is not None:
            n_all_reduce += _replace(program, node, decision, axis, placements, renamed)
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
            n_scatter += moved == "reduce_scatter"
    program.set_outputs(outputs)
    _refresh_all(program, tp)
    return {"tp_all_reduces": n_all_reduce, "tp_all_gathers": n_gather, "tp_reduce_scatters": n_scatter}


def _maker(program: DistProgram, at: fx.Node) -> redistribute.Make:
    """New nodes at the insertion point without a `val`: _refresh_all gives every node its local one."""

    def make(target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
        node = program.graph.call_function(target, args, kwargs or {})
        meta.copy_provenance(at, node, ORIGIN)
        return node

    return make


def _redistribute(
    program: DistProgram, x: fx.Node, have: Any, want: Any, axis: str, at: fx.Node
) -> tuple[fx.Node, str]:
    """Insert (at the current point) what turns placement `have` into `want` (passes/redistribute.py)."""
    shape = list(x.meta["val"].shape)  # still the global shape: vals are made local at the end
    make = _maker(program, at)
    return redistribute.redistribute(
        make, x, have, want, axis, program.mesh.size(axis), shape, role=meta.TP_REDISTRIBUTE
    )


def _decompose(program: DistProgram, node: fx.Node, axis: str, out_pl: Any, tp: int) -> fx.Node:
    """addmm(bias, a, b) with a partial-sum product: all_reduce(a @ b) + bias (bias added once); under
    sequence parallelism (out_pl S(0, B) of (B*L, E)) a reduce-scatter of the (B, L, E) sum along L."""
    bias, a, b = node.args[:3]
    make = _maker(program, node)
    with program.graph.inserting_before(node):
        mm = program.graph.call_function(aten.mm.default, (a, b))
        mm.meta = {k: v for k, v in node.meta.items() if k != meta.PLACEMENT}
        if isinstance(out_pl, Shard):
            rows, features = node.meta["val"].shape
            tokens = make(aten.view.default, (mm, [out_pl.blocks, rows // out_pl.blocks, features]))
            summed = redistribute.reduce_scatter(make, tokens, axis, "sum", 1, role=meta.TP_REDISTRIBUTE)
            biased = make(aten.add.Tensor, (summed, bias))
            out = make(aten.view.default, (biased, [rows // tp, features]))  # local rows
            out.meta["val"] = node.meta["val"]  # global until _refresh_all
        else:
            summed = redistribute.all_reduce(make, mm, axis, "sum", role=meta.TP_REDISTRIBUTE)
            summed.meta.update({k: v for k, v in mm.meta.items() if k not in summed.meta})
            out = program.graph.call_function(aten.add.Tensor, (summed, bias))
            out.meta = dict(mm.meta)
            out.meta[meta.ORIGIN] = ORIGIN
    node.replace_all_uses_with(out)
    program.graph.erase_node(node)
    return out


def _replace(program: DistProgram, node: fx.Node, decision: Any, axis: str, placements: dict, renamed: dict) -> int:
    """Replace `node` by the local ops its vocab-parallel rule builds; returns the all-reduces added.
    The new nodes get their local `val` in _refresh_all; the results keep the global one till then."""
    base, targets = _maker(program, node), []

    def make(target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
        targets.append(target)
        return base(target, args, kwargs)

    with program.graph.inserting_before(node):
        made = decision.rewrite(make, axis)
    added = targets.count(redistribute.ALL_REDUCE)
    if isinstance(made, list):  # a multi-output op: its getitem users take the parts
        for user in list(node.users):
            part = made[user.args[1]]
            part.meta["val"] = user.meta["val"]
            placements[part] = R
            user.replace_all_uses_with(part)
            program.graph.erase_node(user)
            renamed[user] = part
    else:
        made.meta["val"] = node.meta["val"]
        placements[made] = decision.out
        if decision.out != R:
            made.meta.setdefault(meta.PLACEMENT, {})[axis] = decision.out
        node.replace_all_uses_with(made)
        renamed[node] = made
    program.graph.erase_node(node)
    return added


def _local_shape(node: fx.Node, p: Any, tp: int) -> list[int]:
    shape = list(node.meta["val"].shape)
    if isinstance(p, Shard):
        shape[p.dim] //= tp
    return shape


def _rewrite_sizes(node: fx.Node, placements: dict, tp: int) -> None:
    """Size arguments hold global sizes: give sharded outputs their local ones."""
    p = placements.get(node, R)
    if node.target in RESHAPES or node.target is aten.expand.default:
        if isinstance(p, Shard):
            node.args = (node.args[0], _local_shape(node, p, tp), *node.args[2:])
    elif node.target in (aten.slice_backward.default, aten.select_backward.default):
        if isinstance(p, Shard):
            node.args = (node.args[0], _local_shape(node, p, tp), *node.args[2:])
    elif node.target in (aten.split.Tensor, aten.split_with_sizes.default):
        src_p = placements.get(node.args[0], R)
        dim = (node.args[2] if len(node.args) > 2 else 0) % node.args[0].meta["val"].dim()
        if isinstance(src_p, Shard) and src_p.dim == dim:
            size = node.args[1]
            local = [k // tp for k in size] if isinstance(size, (list, tuple)) else size // tp
            node.args = (node.args[0], local, *node.args[2:])


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
