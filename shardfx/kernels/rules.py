"""Fusion rules: a table keyed by ATen op. Adding an op means adding a row.

Each row says what kind of op it is for region building and how it lowers to
Triton: `emit(e, node, args)` returns the expression of the node's value
(a tuple of them for multi-output ops), where `args` are the node's args with
every tensor replaced by the name of its value in the kernel. `e` is the
codegen's Emitter (casts, temporaries, literals); see codegen.py.

Kinds:
  pointwise   elementwise with torch broadcasting; Python scalars become literals
  view        reshapes that keep the value's (rows, cols) layout: free in a kernel
  reduction   over the last dim only, keepdim or not: needs whole rows
  gather      x.gather(-1, index[..., 1]): one element per row (a row reduction)
  scatter     base.scatter(-1, index[..., 1], value): one element per row replaced
  const       a constant tensor (zeros_like, scalar_tensor): a literal
  getitem     one element of a multi-output row (var_mean)

Elementwise float math runs in fp32 whatever the storage dtype; a cast to
bf16/fp16 inside a region rounds (`.to(bf16).to(f32)`) so the kernel rounds
where eager does. tanh is written with exp: the interpreter has no libdevice.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from shardfx.graphs import ops

aten = torch.ops.aten
prims = torch.ops.prims

POINTWISE, VIEW, REDUCTION, GATHER, SCATTER, CONST, GETITEM = (
    "pointwise",
    "view",
    "reduction",
    "gather",
    "scatter",
    "const",
    "getitem",
)


@dataclass(frozen=True)
class Rule:
    kind: str
    emit: Callable[[Any, fx.Node, list[Any]], Any]
    check: Callable[[fx.Node], bool] = lambda node: True  # extra conditions on non-tensor args


def _binary(sym: str) -> Callable[[Any, fx.Node, list[Any]], str]:
    return lambda e, n, a: f"{e.cast(n, a[0])} {sym} {e.cast(n, a[1])}"


def _compare(sym: str) -> Callable[[Any, fx.Node, list[Any]], str]:
    return lambda e, n, a: f"{e.common(a[0], a[1])[0]} {sym} {e.common(a[0], a[1])[1]}"


def _unary(fmt: str) -> Callable[[Any, fx.Node, list[Any]], str]:
    return lambda e, n, a: fmt.format(x=e.f(a[0]))


def _tanh(e: Any, n: fx.Node, a: list[Any]) -> str:
    # tanh(x) = 1 - 2 / (exp(2x) + 1): exact at +-inf, absolute error ~1e-7 near 0
    return f"1.0 - 2.0 / (tl.exp(2.0 * {e.f(a[0])}) + 1.0)"


def _pow(e: Any, n: fx.Node, a: list[Any]) -> str:
    x, p = e.f(a[0]), a[1]
    if p == 0.5:
        return f"tl.sqrt({x})"
    if p == -0.5:
        return f"tl.rsqrt({x})"
    return " * ".join([x] * int(p)) if int(p) >= 1 else f"1.0 / ({' * '.join([x] * -int(p))})"


def _pow_ok(n: fx.Node) -> bool:
    p = n.args[1]
    return isinstance(p, (int, float)) and (p in (0.5, -0.5) or (float(p).is_integer() and 1 <= abs(p) <= 4))


def _alpha_one(n: fx.Node) -> bool:
    return n.kwargs.get("alpha", 1) == 1


def _to(e: Any, n: fx.Node, a: list[Any]) -> str:
    return e.convert(a[0], n.meta["val"].dtype)


def _to_ok(n: fx.Node) -> bool:
    allowed = {"dtype", "device", "layout", "memory_format", "pin_memory", "non_blocking"}
    return set(n.kwargs) <= allowed and n.kwargs.get("memory_format") in (None, torch.preserve_format)


def _last_dim(n: fx.Node) -> bool:
    x = n.args[0]
    dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    ndim = x.meta["val"].dim() if isinstance(x, fx.Node) else 0
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] % max(ndim, 1) == ndim - 1 and ndim >= 1


def _sum(e: Any, n: fx.Node, a: list[Any]) -> str:
    x = e.full(e.cast(n, a[0]))
    zero = "0.0" if n.meta["val"].dtype.is_floating_point else "0"
    return f"tl.sum(tl.where(mask, {x}, {zero}), axis=1, keep_dims=True)"


def _amax(e: Any, n: fx.Node, a: list[Any]) -> str:
    return f"tl.max(tl.where(mask, {e.full(e.f(a[0]))}, float('-inf')), axis=1, keep_dims=True)"


def _amin(e: Any, n: fx.Node, a: list[Any]) -> str:
    return f"tl.min(tl.where(mask, {e.full(e.f(a[0]))}, float('inf')), axis=1, keep_dims=True)"


def _mean(e: Any, n: fx.Node, a: list[Any]) -> str:
    return f"tl.sum(tl.where(mask, {e.full(e.f(a[0]))}, 0.0), axis=1, keep_dims=True) / C"


def _var_mean(e: Any, n: fx.Node, a: list[Any]) -> tuple[str, str]:
    # two passes over the row in registers, as exact as eager's Welford for these sizes
    correction = n.kwargs.get("correction", 1)
    x = e.tmp(e.full(e.f(a[0])))
    mean = e.tmp(f"tl.sum(tl.where(mask, {x}, 0.0), axis=1, keep_dims=True) / C")
    centered = e.tmp(f"tl.where(mask, {x} - {mean}, 0.0)")
    var = e.tmp(f"tl.sum({centered} * {centered}, axis=1, keep_dims=True) / (C - {correction})")
    return var, mean


def _var_mean_ok(n: fx.Node) -> bool:
    return _last_dim(n) and set(n.kwargs) <= {"correction", "keepdim"}


def _gather(e: Any, n: fx.Node, a: list[Any]) -> str:
    zero = "0.0" if n.meta["val"].dtype.is_floating_point else "0"
    return f"tl.sum(tl.where(cols == {a[2]}, {e.full(e.cast(n, a[0]))}, {zero}), axis=1, keep_dims=True)"


def _gather_ok(n: fx.Node) -> bool:
    x, dim, index = n.args[:3]
    ndim = x.meta["val"].dim()
    return dim % ndim == ndim - 1 and index.meta["val"].shape[-1] == 1 and not n.kwargs.get("sparse_grad", False)


def _scatter(e: Any, n: fx.Node, a: list[Any]) -> str:
    return f"tl.where(cols == {a[2]}, {e.cast(n, a[3])}, {e.full(e.cast(n, a[0]))})"


def _scatter_ok(n: fx.Node) -> bool:
    base, dim, index, _ = n.args[:4]
    ndim = base.meta["val"].dim()
    return dim % ndim == ndim - 1 and index.meta["val"].shape[-1] == 1 and "reduce" not in n.kwargs


def _const(e: Any, n: fx.Node, a: list[Any]) -> str:
    target = n.target
    value = 0 if target is aten.zeros_like.default else 1 if target is aten.ones_like.default else a[-1]
    if target is aten.scalar_tensor.default:
        value = a[0]
    if target is aten.full_like.default:
        value = a[1]
    return e.literal(value, n.meta["val"].dtype)


def _where(e: Any, n: fx.Node, a: list[Any]) -> str:
    return f"tl.where({e.val(a[0])}, {e.cast(n, a[1])}, {e.cast(n, a[2])})"


def _identity(e: Any, n: fx.Node, a: list[Any]) -> str:
    return e.val(a[0])


def _getitem(e: Any, n: fx.Node, a: list[Any]) -> str:
    return e.item(n.args[0], n.args[1])


_pw = lambda emit, check=lambda n: True: Rule(POINTWISE, emit, check)  # noqa: E731

RULES: dict[Any, Rule] = {
    # arithmetic (Tensor and Scalar overloads share a row's code)
    aten.add.Tensor: _pw(_binary("+"), _alpha_one),
    aten.add.Scalar: _pw(_binary("+"), _alpha_one),
    aten.sub.Tensor: _pw(_binary("-"), _alpha_one),
    aten.sub.Scalar: _pw(_binary("-"), _alpha_one),
    aten.rsub.Scalar: _pw(lambda e, n, a: f"{e.cast(n, a[1])} - {e.cast(n, a[0])}", _alpha_one),
    aten.mul.Tensor: _pw(_binary("*")),
    aten.mul.Scalar: _pw(_binary("*")),
    aten.div.Tensor: _pw(lambda e, n, a: f"{e.f(a[0])} / {e.f(a[1])}", lambda n: "rounding_mode" not in n.kwargs),
    aten.div.Scalar: _pw(lambda e, n, a: f"{e.f(a[0])} / {e.f(a[1])}"),
    aten.neg.default: _pw(lambda e, n, a: f"-{e.cast(n, a[0])}"),
    aten.pow.Tensor_Scalar: _pw(_pow, _pow_ok),
    aten.maximum.default: _pw(lambda e, n, a: f"tl.maximum({e.cast(n, a[0])}, {e.cast(n, a[1])})"),
    aten.minimum.default: _pw(lambda e, n, a: f"tl.minimum({e.cast(n, a[0])}, {e.cast(n, a[1])})"),
    # transcendental (fp32)
    aten.exp.default: _pw(_unary("tl.exp({x})")),
    aten.log.default: _pw(_unary("tl.log({x})")),
    aten.sqrt.default: _pw(_unary("tl.sqrt({x})")),
    aten.rsqrt.default: _pw(_unary("tl.rsqrt({x})")),
    aten.reciprocal.default: _pw(_unary("1.0 / {x}")),
    aten.abs.default: _pw(_unary("tl.abs({x})")),
    aten.erf.default: _pw(_unary("tl.erf({x})")),
    aten.tanh.default: _pw(_tanh),
    aten.sigmoid.default: _pw(_unary("tl.sigmoid({x})")),
    aten.relu.default: _pw(_unary("tl.maximum({x}, 0.0)")),
    # comparisons and selection
    aten.ne.Scalar: _pw(_compare("!=")),
    aten.ne.Tensor: _pw(_compare("!=")),
    aten.eq.Scalar: _pw(_compare("==")),
    aten.eq.Tensor: _pw(_compare("==")),
    aten.gt.Scalar: _pw(_compare(">")),
    aten.gt.Tensor: _pw(_compare(">")),
    aten.lt.Scalar: _pw(_compare("<")),
    aten.lt.Tensor: _pw(_compare("<")),
    aten.ge.Scalar: _pw(_compare(">=")),
    aten.le.Scalar: _pw(_compare("<=")),
    aten.where.self: _pw(_where),
    # type conversions
    aten._to_copy.default: _pw(_to, _to_ok),
    prims.convert_element_type.default: _pw(_to),
    aten.clone.default: _pw(_identity, lambda n: n.kwargs.get("memory_format") in (None, torch.preserve_format)),
    aten.expand.default: _pw(_identity),  # broadcasting is the tile's shape
    # views of the same layout
    aten.view.default: Rule(VIEW, _identity),
    aten._unsafe_view.default: Rule(VIEW, _identity),
    aten.reshape.default: Rule(VIEW, _identity),
    aten.unsqueeze.default: Rule(VIEW, _identity),
    aten.squeeze.dim: Rule(VIEW, _identity),
    aten.squeeze.dims: Rule(VIEW, _identity),
    aten.alias.default: Rule(VIEW, _identity),
    aten.detach.default: Rule(VIEW, _identity),
    # reductions over the last dim
    aten.sum.dim_IntList: Rule(REDUCTION, _sum, lambda n: _last_dim(n) and n.kwargs.get("dtype") is None),
    aten.amax.default: Rule(REDUCTION, _amax, _last_dim),
    aten.amin.default: Rule(REDUCTION, _amin, _last_dim),
    aten.mean.dim: Rule(REDUCTION, _mean, lambda n: _last_dim(n) and n.kwargs.get("dtype") is None),
    aten.var_mean.correction: Rule(REDUCTION, _var_mean, _var_mean_ok),
    operator.getitem: Rule(GETITEM, _getitem),
    # one element per row
    aten.gather.default: Rule(GATHER, _gather, _gather_ok),
    aten.scatter.value: Rule(SCATTER, _scatter, _scatter_ok),
    # constants
    aten.zeros_like.default: Rule(CONST, _const),
    aten.ones_like.default: Rule(CONST, _const),
    aten.full_like.default: Rule(CONST, _const),
    aten.scalar_tensor.default: Rule(CONST, _const),
}

# Composite ops the fuse pass first rewrites into the ops above (torch's own decompositions),
# so that layer norm, GELU, softmax and cross-entropy (and their backwards) fuse.
DECOMPOSE = (
    aten.native_layer_norm.default,
    aten.native_layer_norm_backward.default,
    aten.gelu.default,
    aten.gelu_backward.default,
    aten._softmax.default,
    aten._softmax_backward_data.default,
    aten._log_softmax.default,
    aten._log_softmax_backward_data.default,
    aten.nll_loss_forward.default,
    aten.nll_loss_backward.default,
    aten.silu.default,
    aten.silu_backward.default,
    aten.sigmoid_backward.default,
    aten.tanh_backward.default,
    aten.threshold_backward.default,
)


def rule(node: fx.Node) -> Rule | None:
    """The row for a node, or None when it cannot be part of a region."""
    if node.op != "call_function" or ops.is_random(node):  # a region runs once: no random op in it
        return None
    r = RULES.get(node.target)
    if r is None:
        return None
    try:
        return r if r.check(node) else None
    except (AttributeError, KeyError, TypeError, IndexError):
        return None
