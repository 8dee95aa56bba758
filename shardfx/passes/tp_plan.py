"""The tensor-parallel plan: which Linear layers of the traced graph split, and how.

Every Linear (a forward mm/addmm whose weight operand is t(a 2-D parameter))
gets a style: "colwise" (weight rows split: each rank computes a slice of the
output features), "rowwise" (weight columns split: each rank computes a partial
sum of the output) or "replicate".
- auto: a Linear whose output reaches another Linear's input through the ops
  of FRIENDLY only is colwise, the other rowwise (attention qkv -> proj, MLP
  fc -> proj). A colwise output split into k equal parts (a fused q|k|v) is
  sharded per part (blocks=k). A pair whose sizes do not divide is left
  replicated (the pass demotes pairs whose shards had to be gathered back).
- user: {module pattern: style} (fnmatch); a split that cannot be made is an
  error naming the module and the sizes.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from shardfx.graphs import meta, ops
from shardfx.graphs.placement import Shard
from shardfx.graphs.program import DistProgram
from shardfx.graphs.signature import PARAM
from shardfx.passes.tp_rules import POINTWISE

aten = torch.ops.aten
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
    unmatched = [pat for pat in patterns if not any(fnmatch.fnmatch(lin.module, pat) for lin in linears)]
    if unmatched:
        modules = ", ".join(lin.module for lin in linears) or "none"
        raise ValueError(
            f"tp_plan pattern {', '.join(map(repr, unmatched))} matches no Linear layer of the model; "
            f"its Linear layers: {modules}"
        )
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


def param_placements(linears: list[Linear], styles: dict[str, str]) -> dict[fx.Node, Any]:
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


def nearest_pair(node: fx.Node, linears: list[Linear], styles: dict[str, str]) -> Linear | None:
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
