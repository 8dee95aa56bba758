"""Whether a node fits a region's domain, and how its result and operands lie there.

`classify(node, domain)` is the one place that decides; the fuse pass asks it
when it grows a region and codegen asks it again for the load of each operand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from shardfx.kernels import rules
from shardfx.kernels.layout import FULL, ROW, SCALAR, Domain, operand_kind, value_kind

# A reduction keeps its whole row in registers: beyond this many columns a
# persistent row kernel spills; such rows stay with the eager ops.
MAX_ROW = 16384
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.bool)


@dataclass(frozen=True)
class Fit:
    out: tuple[str, ...]  # kind of each result (one for single-output ops)
    operands: dict[int, str]  # positional arg index -> kind of that tensor operand as the node reads it


def _shape(x: fx.Node) -> tuple[int, ...]:
    return tuple(int(s) for s in x.meta["val"].shape)


def _tensors(value: object) -> list[torch.Tensor] | None:
    vals = list(value) if isinstance(value, (tuple, list)) else [value]
    if not all(isinstance(v, torch.Tensor) and v.dtype in _DTYPES for v in vals):
        return None
    return vals


def domain_for(node: fx.Node) -> Domain | None:
    """The domain a region seeded by `node` runs over."""
    r = rules.rule(node)
    if r is None or r.kind == rules.GETITEM:
        return None
    source = node.args[0] if r.kind in (rules.REDUCTION, rules.GATHER) else node
    val = source.meta.get("val") if isinstance(source, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() == 0 or val.numel() <= 1:
        return None
    return Domain.of_shape(val.shape)


def classify(node: fx.Node, domain: Domain, members: set[fx.Node] | frozenset[fx.Node] = frozenset()) -> Fit | None:
    """How `node` lies in `domain`, or None. `members`: the region's nodes (their kinds must agree)."""
    r = rules.rule(node)
    if r is None:
        return None
    if r.kind == rules.GETITEM:
        parent = node.args[0]
        ok = parent in members and _tensors(node.meta.get("val")) is not None
        return Fit((ROW,), {}) if ok and value_kind(_shape(node), domain) == ROW else None
    vals = _tensors(node.meta.get("val"))
    if vals is None:
        return None
    out_kinds = tuple(value_kind(v.shape, domain) for v in vals)
    if any(k not in (FULL, ROW) for k in out_kinds):
        return None
    tensor_args = [(i, a) for i, a in enumerate(node.args) if isinstance(a, fx.Node)]
    if any(_tensors(a.meta.get("val")) is None or isinstance(a.meta["val"], (tuple, list)) for _, a in tensor_args):
        return None
    operands: dict[int, str] = {}
    if r.kind == rules.CONST:
        return Fit(out_kinds, {})  # reads nothing: the tensor arg gives only the shape
    if r.kind in (rules.REDUCTION, rules.GATHER, rules.SCATTER):
        if domain.cols > MAX_ROW:
            return None
        x = node.args[0]
        if value_kind(_shape(x), domain) != FULL:
            return None
        operands[0] = FULL
        if r.kind in (rules.GATHER, rules.SCATTER):
            index = node.args[2]
            if value_kind(_shape(index), domain) != ROW:
                return None
            operands[2] = ROW
            if r.kind == rules.SCATTER and isinstance(node.args[3], fx.Node):
                return None
        expected = (ROW,) * len(out_kinds) if r.kind != rules.SCATTER else (FULL,)
        return Fit(out_kinds, operands) if out_kinds == expected and _agree(node, operands, domain, members) else None
    if r.kind == rules.VIEW:
        x = node.args[0]
        kind = value_kind(_shape(x), domain)
        if kind != out_kinds[0]:
            return None
        return Fit(out_kinds, {0: kind}) if _agree(node, {0: kind}, domain, members) else None
    out_shape = _shape(node)
    for i, a in tensor_args:
        kind = operand_kind(_shape(a), out_shape, out_kinds[0], domain)
        if kind is None:
            return None
        operands[i] = kind
    return Fit(out_kinds, operands) if _agree(node, operands, domain, members) else None


def _agree(node: fx.Node, operands: dict[int, str], domain: Domain, members: set[fx.Node] | frozenset) -> bool:
    """An operand computed in the region must be read the way it lies there (no COL or SCALAR views of it)."""
    for i, kind in operands.items():
        a = node.args[i]
        if a in members and value_kind(_shape(a), domain) != kind:
            return False
        if kind == SCALAR and a in members:
            return False
    return True
