"""The tensor-parallel plan: which Linear layers of the traced graph split, how, and why not.

A Linear is a forward mm/addmm one of whose operands is a 2-D parameter: t(W),
W.permute(1, 0) or W.transpose(0, 1) of an (out, in) weight (nn.Linear,
F.linear, `x @ W.T`), or W itself stored (in, out) (Hugging Face's Conv1D,
`x @ W`). Each gets a style: "colwise" (the output features split: each rank
computes a slice), "rowwise" (the input features split: each rank computes a
partial sum of the output) or "replicate".
- auto (Megatron's plan): a group is one rowwise Linear and the colwise
  Linears whose outputs reach its input through element-wise, view,
  softmax and attention ops, inside the module that holds it (attention: q, k,
  v -> o; MLP: gate, up -> down). The walk stops at norms and leaves the
  module, so it never crosses a residual add or pairs a block's output with
  the head. A colwise output split into k equal parts (a fused q|k|v) is
  sharded per part (blocks=k). Sizes that do not divide leave the group
  replicated; so does a split the rules cannot carry to the rowwise input (the
  pass demotes the group whose shard had to be gathered back), with the real
  reason recorded per Linear.
- user: {module pattern: style} (fnmatch); a pattern that matches no Linear,
  or a split that cannot be made, is a ValueError naming it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from shardfx.graphs import meta, ops
from shardfx.graphs.placement import Shard
from shardfx.graphs.program import DistProgram
from shardfx.graphs.signature import PARAM
from shardfx.passes import tp_rules

aten = torch.ops.aten
STYLES = ("colwise", "rowwise", "replicate")
TRANSPOSES = (aten.t.default, aten.permute.default, aten.transpose.int)


@dataclass
class Linear:
    module: str
    weight: fx.Node  # the parameter placeholder
    bias: fx.Node | None
    matmul: fx.Node  # the forward mm/addmm
    out_dim: int = 0  # the weight's dim of output features: 0 for (out, in), 1 for Conv1D's (in, out)
    blocks: int = 1

    @property
    def out_features(self) -> int:
        return self.weight.meta["val"].shape[self.out_dim]

    @property
    def in_features(self) -> int:
        return self.weight.meta["val"].shape[1 - self.out_dim]

    @property
    def activation(self) -> Any:
        return self.matmul.args[1] if self.matmul.target is aten.addmm.default else self.matmul.args[0]

    @property
    def nbytes(self) -> int:
        val = self.weight.meta["val"]
        return val.numel() * val.element_size()


@dataclass
class Group:
    row: Linear
    cols: list[Linear]


@dataclass
class Plan:
    styles: dict[str, str]  # module -> style
    reasons: dict[str, str] = field(default_factory=dict)  # module -> why this style (or why not split)
    groups: list[Group] = field(default_factory=list)


def _is_transpose_of(node: Any, names: dict) -> bool:
    if not (isinstance(node, fx.Node) and node.target in TRANSPOSES and node.args[0] in names):
        return False
    if node.target is aten.permute.default:
        return list(node.args[1]) == [1, 0]
    return True  # t() or transpose(0, 1) of a 2-D tensor


def find_linears(program: DistProgram) -> list[Linear]:
    """The model's Linear layers (see the module docstring), in graph order."""
    names = {n: s.name for s, n in zip(program.signature.inputs, program.placeholders()) if s.role == PARAM}
    found: dict[fx.Node, Linear] = {}
    for node in program.graph.nodes:
        if node.op != "call_function" or meta.phase(node) != meta.FORWARD:
            continue
        if node.target not in (aten.mm.default, aten.addmm.default):
            continue
        operand = node.args[2] if node.target is aten.addmm.default else node.args[1]
        if _is_transpose_of(operand, names):
            weight, out_dim = operand.args[0], 0
        elif isinstance(operand, fx.Node) and operand in names:
            weight, out_dim = operand, 1
        else:
            continue
        if weight in found or weight.meta["val"].dim() != 2:
            continue  # a tied weight used twice stays replicated (its second use is e.g. an embedding)
        bias = node.args[0] if node.target is aten.addmm.default and node.args[0] in names else None
        module = names[weight].rsplit(".", 1)[0]
        found[weight] = Linear(module, weight, bias, node, out_dim)
    tied = {w for w in found if any(u.target is aten.embedding.default for u in w.users)}
    linears = [lin for lin in found.values() if lin.weight not in tied]
    for lin in linears:
        lin.blocks = _blocks(lin)
    return linears


RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}


def _blocks(lin: Linear) -> int:
    """k when the output (through reshapes of its leading dims) is split into k equal parts along its
    features: a fused q|k|v; 1 otherwise."""
    frontier = [lin.matmul]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            shape = user.meta.get("val")
            if user.target in RESHAPES and hasattr(shape, "shape") and shape.shape[-1] == lin.out_features:
                frontier.append(user)
            elif user.target is aten.split.Tensor and user.args[0] is node:
                dim = user.args[2] if len(user.args) > 2 else 0
                parts = user.meta["val"]
                if dim % node.meta["val"].dim() == node.meta["val"].dim() - 1 and len(parts) > 1:
                    if len({p.shape[-1] for p in parts}) == 1:
                        return len(parts)
    return 1


# Ops a colwise output passes through on its way to the rowwise Linear of its group.
FRIENDLY = (
    tp_rules.POINTWISE
    | ops.with_tp_rule("view")
    | ops.with_tp_rule("dims")
    | ops.with_tp_rule("split")
    | ops.with_tp_rule("unbind")
    | ops.with_tp_rule("stack")
    | ops.with_tp_rule("getitem")
    | ops.with_tp_rule("permute")
    | ops.with_tp_rule("cat")
    | ops.with_tp_rule("bmm")
    | tp_rules.SOFTMAX
    | {aten.mm.default, aten.native_dropout.default}
    | {op for op in ops.of_kind(ops.ATTENTION) if not ops.attention(op).backward}
)
NORM_DIVISORS = {aten.rsqrt.default, aten.sqrt.default}  # x * rsqrt(mean(x^2)): a norm, decomposed


def _is_norm(node: fx.Node) -> bool:
    if node.target in (aten.native_layer_norm.default, aten.var_mean.correction):
        return True
    if node.target in (aten.mul.Tensor, aten.div.Tensor):
        return any(isinstance(a, fx.Node) and a.target in NORM_DIVISORS for a in node.args)
    return False


def _parent(module: str) -> str:
    return module.rsplit(".", 1)[0] if "." in module else ""


def _scope(lin: Linear, linears: list[Linear]) -> str:
    """The module a group stays inside: the Linear's parent, or its grandparent when the parent holds
    no other Linear (BERT's attention.output.dense pairs with attention.self's q, k, v)."""
    parent = _parent(lin.module)
    inside = lambda m, scope: scope == "" or m == scope or m.startswith(scope + ".")  # noqa: E731
    if parent and not any(o is not lin and inside(o.module, parent) for o in linears):
        return _parent(parent)
    return parent


def _inside(node: fx.Node, scope: str) -> bool:
    """Whether `node` comes from `scope`; a node without a module path (the forward-only capture of
    eval_step keeps none) counts as inside: the norm stop and the graph alone bound the walk."""
    module = node.meta.get(meta.MODULE, "")
    return scope == "" or module == "" or module == scope or module.startswith(scope + ".")


def _feeders(lin: Linear, by_matmul: dict[fx.Node, Linear], scope: str) -> list[Linear]:
    """The Linears whose outputs reach `lin`'s input through FRIENDLY ops inside `scope`."""
    found: list[Linear] = []
    frontier, seen = [lin.activation], set()
    while frontier:
        node = frontier.pop()
        if not isinstance(node, fx.Node) or node in seen:
            continue
        seen.add(node)
        other = by_matmul.get(node)
        if other is not None:
            if other is not lin and other not in found:
                found.append(other)
            continue
        if node.op != "call_function" or not _inside(node, scope) or node.target not in FRIENDLY or _is_norm(node):
            continue
        frontier.extend(node.all_input_nodes)
    order = {lin.matmul: i for i, lin in enumerate(by_matmul.values())}
    return sorted(found, key=lambda c: order[c.matmul])


def find_groups(linears: list[Linear]) -> list[Group]:
    """One group per rowwise Linear, in graph order; a Linear already rowwise is nobody's colwise,
    and a Linear already colwise is not rowwise (a chain of three splits only its first pair)."""
    by_matmul = {lin.matmul: lin for lin in linears}
    rows: set[str] = set()
    cols: set[str] = set()
    groups = []
    for lin in linears:
        if lin.module in cols:
            continue
        feeders = [c for c in _feeders(lin, by_matmul, _scope(lin, linears)) if c.module not in rows | cols]
        if feeders:
            groups.append(Group(lin, feeders))
            rows.add(lin.module)
            cols.update(c.module for c in feeders)
    return groups


def _fits(group: Group, tp: int) -> str | None:
    """Why the group's sizes do not divide by tp, or None."""
    for col in group.cols:
        if col.out_features % (tp * col.blocks):
            parts = f" in each of its {col.blocks} parts" if col.blocks > 1 else ""
            return f"{col.module}: out_features {col.out_features} do not divide by tp={tp}{parts}"
    if group.row.in_features % tp:
        return f"{group.row.module}: in_features {group.row.in_features} do not divide by tp={tp}"
    return None


def auto_plan(linears: list[Linear], tp: int, demoted: dict[str, str]) -> Plan:
    """Megatron's plan over the groups. `demoted`: module -> why it stays replicated; a demoted row
    leaves its whole group replicated, a demoted colwise Linear only itself (grouped-query
    attention whose kv heads do not divide tp: q and o split, k and v computed whole and each
    rank takes its heads' share after the repeat)."""
    plan = Plan({lin.module: "replicate" for lin in linears}, groups=find_groups(linears))
    grouped = set()
    for group in plan.groups:
        grouped.update(m.module for m in [group.row, *group.cols])
        cols = [c for c in group.cols if c.module not in demoted]
        why = demoted.get(group.row.module) or _fits(Group(group.row, cols), tp)
        if not cols:
            why = why or demoted[group.cols[0].module]
        for m in [group.row, *group.cols]:
            if why is not None or m.module in demoted:
                plan.reasons[m.module] = f"replicated: {why or demoted[m.module]}"
            elif m is group.row:
                plan.styles[m.module] = "rowwise"
                plan.reasons[m.module] = "rowwise after " + ", ".join(c.module for c in cols)
            else:
                plan.styles[m.module] = "colwise"
                plan.reasons[m.module] = f"colwise into {group.row.module}" + (
                    f" ({m.blocks} parts)" if m.blocks > 1 else ""
                )
    for lin in linears:
        if lin.module not in grouped:
            plan.reasons[lin.module] = (
                "replicated: no Linear of its module reads its output through element-wise, view or "
                "attention ops, and it reads none's (a split needs a colwise -> rowwise pair)"
            )
    return plan


def user_plan(linears: list[Linear], patterns: dict[str, str], tp: int) -> Plan:
    for style in patterns.values():
        if style not in STYLES:
            raise ValueError(f"tensor-parallel style {style!r} is not one of {list(STYLES)}")
    unmatched = [pat for pat in patterns if not any(fnmatch.fnmatch(lin.module, pat) for lin in linears)]
    if unmatched:
        modules = ", ".join(lin.module for lin in linears) or "none"
        raise ValueError(
            f"tp_plan pattern {', '.join(map(repr, unmatched))} matches no Linear layer of the model; "
            f"its Linear layers: {modules}"
        )
    plan = Plan({})
    for lin in linears:
        pattern, style = next(((pat, s) for pat, s in patterns.items() if fnmatch.fnmatch(lin.module, pat)), ("", ""))
        style = style or "replicate"
        if style == "colwise" and lin.out_features % (tp * lin.blocks):
            raise ValueError(
                f"{lin.module}: colwise needs out_features {lin.out_features} divisible by tp={tp}"
                + (f" in each of its {lin.blocks} parts" if lin.blocks > 1 else "")
            )
        if style == "rowwise" and lin.in_features % tp:
            raise ValueError(f"{lin.module}: rowwise needs in_features {lin.in_features} divisible by tp={tp}")
        plan.styles[lin.module] = style
        plan.reasons[lin.module] = (
            f"{style}: tp_plan pattern {pattern!r}" if pattern else "replicate: no tp_plan pattern"
        )
    return plan


def param_placements(linears: list[Linear], styles: dict[str, str]) -> dict[fx.Node, Any]:
    out: dict[fx.Node, Any] = {}
    for lin in linears:
        style = styles.get(lin.module, "replicate")
        if style == "colwise":
            out[lin.weight] = Shard(lin.out_dim, lin.blocks)
            if lin.bias is not None:
                out[lin.bias] = Shard(0, lin.blocks)
        elif style == "rowwise":
            out[lin.weight] = Shard(1 - lin.out_dim)
    return out


def culprits(node: fx.Node, plan: Plan, linears: list[Linear], placements: dict[fx.Node, Any]) -> list[str]:
    """What to leave replicated for a gather at `node`: the colwise Linears its sharded inputs come
    from when they are only some of their group's (k and v of grouped-query attention), else the
    group's rowwise Linear (the whole group). Empty when no split Linear feeds it."""
    by_matmul = {lin.matmul: lin for lin in linears if plan.styles.get(lin.module) != "replicate"}
    sources: list[Linear] = []
    frontier = [a for a in node.all_input_nodes if isinstance(placements.get(a), Shard)]
    seen: set[fx.Node] = set()
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in by_matmul:
            sources.append(by_matmul[n])
            continue
        p = placements.get(n)
        if isinstance(p, Shard) or (isinstance(p, tuple) and any(isinstance(x, Shard) for x in p)):
            frontier.extend(n.all_input_nodes)  # back along the shard only
    for group in plan.groups:
        if plan.styles.get(group.row.module) != "rowwise":
            continue
        live = [c for c in group.cols if plan.styles.get(c.module) == "colwise"]
        hit = [c for c in live if c in sources]
        if hit and len(hit) < len(live):
            return [c.module for c in hit]
        if hit or group.row in sources:
            return [group.row.module]
    return []


@dataclass
class Vocab:
    """The vocab-parallel split: the head feeding the cross-entropy and the embeddings of its size."""

    size: int
    head: fx.Node | None  # the head's weight placeholder (V, E)
    head_bias: fx.Node | None
    embeddings: list[fx.Node]  # embedding weight placeholders (V, E), the head's when tied
    head_module: str = ""

    def placements(self) -> dict[fx.Node, Any]:
        out: dict[fx.Node, Any] = {w: Shard(0) for w in self.embeddings}
        if self.head is not None:
            out[self.head] = Shard(0)
        if self.head_bias is not None:
            out[self.head_bias] = Shard(0)
        return out


LOSS_PATH = RESHAPES | {
    aten._to_copy.default,
    torch.ops.prims.convert_element_type.default,
    aten.slice.Tensor,
    aten.clone.default,
}


def _feeds_log_softmax(node: fx.Node) -> bool:
    frontier = [node]
    while frontier:
        n = frontier.pop()
        for user in n.users:
            if user.target is aten._log_softmax.default:
                return True
            if user.target in LOSS_PATH:
                frontier.append(user)
    return False


def find_vocab(program: DistProgram, tp: int) -> tuple[Vocab | None, str]:
    """The head whose logits go to a log_softmax (cross-entropy) and the embeddings with its rows;
    (None, why) when there is none or its size does not divide by tp."""
    names = {n: s.name for s, n in zip(program.signature.inputs, program.placeholders()) if s.role == PARAM}
    head = None
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default):
            continue
        if meta.phase(node) != meta.FORWARD:
            continue
        operand = node.args[2] if node.target is aten.addmm.default else node.args[1]
        if _is_transpose_of(operand, names) and _feeds_log_softmax(node):
            head = node
    if head is None:
        return None, "no Linear feeds a cross-entropy"
    weight = (head.args[2] if head.target is aten.addmm.default else head.args[1]).args[0]
    size = weight.meta["val"].shape[0]
    if size % tp:
        return None, f"the vocab {size} does not divide by tp={tp}"
    bias = head.args[0] if head.target is aten.addmm.default and head.args[0] in names else None
    embeddings = [
        n.args[0]
        for n in program.graph.nodes
        if n.target is aten.embedding.default and n.args[0] in names and n.args[0].meta["val"].shape[0] == size
    ]
    embeddings = list(dict.fromkeys(w for w in embeddings if w is not weight))
    tied = any(u.target is aten.embedding.default for u in weight.users)
    if tied:
        embeddings.append(weight)
    module = names[weight].rsplit(".", 1)[0]
    return Vocab(size, None if tied else weight, bias, embeddings, module), ""
