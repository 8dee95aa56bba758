"""One table of facts about ATen ops, read by every pass and analysis that needs them.

For each op the table says what kind of op it is (pointwise, view, reduction,
matmul, attention, norm, ...), whether its output aliases its input's storage
(liveness), which tensor-parallel rule family applies to it (the rules
themselves live in passes/tp_rules.py and are looked up by that name), and for
attention the layout of its arguments: which inputs and outputs carry heads
on dim 1 of (B, H, L, D), where dropout and the mask are, how to count FLOPs.
Whether an op is random comes from torch's own `nondeterministic_seeded` tag,
refined here for attention (random only with dropout).

Every scaled-dot-product variant is a row: the CPU flash kernel, CUDA flash,
memory-efficient, cuDNN and the "overrideable" fused kernel, forward and
backward. Adding an op is one row of OPS.

    facts(node.target).kind == POINTWISE
    attention(node.target).heads_in   # positional args split by heads under tp
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from shardfx.graphs import collectives

aten = torch.ops.aten

# Kinds.
POINTWISE = "pointwise"  # elementwise with broadcasting (casts and copies included)
VIEW = "view"  # reshapes, transposes, slices: no arithmetic
REDUCTION = "reduction"
MATMUL = "matmul"
ATTENTION = "attention"  # a fused scaled-dot-product kernel (forward or backward)
NORM = "norm"
EMBEDDING = "embedding"
CREATE = "create"  # makes a tensor from a shape (ones_like, zeros_like, full)
OTHER = "other"


@dataclass(frozen=True)
class Attention:
    """Argument layout of one scaled-dot-product kernel. Tensors of heads are (B, H, L, D) or (B, H, L)."""

    backward: bool
    heads_in: tuple[int, ...]  # positional args carrying heads on dim 1 (q, k, v; grad_out, out, logsumexp)
    heads_out: tuple[int, ...]  # outputs carrying heads on dim 1; the others are per-call scalars / empty
    n_out: int
    query: int  # position of the query (its shape gives B, H, L, D for FLOPs)
    dropout: tuple[int, str]  # (position, keyword) of dropout_p
    mask: tuple[int | None, str] | None = None  # (position or None for keyword-only, keyword) of mask / bias
    bias_grad: int | None = None  # output index of the mask's gradient (memory-efficient backward)

    def dropout_p(self, node: fx.Node) -> float:
        pos, name = self.dropout
        return node.args[pos] if len(node.args) > pos else node.kwargs.get(name, 0.0)

    def mask_arg(self, node: fx.Node) -> Any:
        if self.mask is None:
            return None
        pos, name = self.mask
        if pos is not None and len(node.args) > pos:
            return node.args[pos]
        return node.kwargs.get(name)

    def flops(self, node: fx.Node) -> int:
        q = node.args[self.query].meta["val"]  # (B, H, L, D)
        k = node.args[self.query + 1].meta["val"]  # (B, H, S, D)
        b, h, lq, d = q.shape
        forward = 4 * b * h * lq * k.shape[2] * d  # QK^T and PV: 2 matmuls of 2*L*S*D each per head
        return int(2.5 * forward) if self.backward else forward  # backward: 5 matmuls of the same size


@dataclass(frozen=True)
class OpFacts:
    kind: str
    alias: bool = False  # the output shares the input's storage (a view)
    tp: str | None = None  # tensor-parallel rule family (passes/tp_rules.py); None: no rule, inputs replicated
    attention: Attention | None = None


def _rows(kind: str, ops: list[Any], **facts: Any) -> dict[Any, OpFacts]:
    return {op: OpFacts(kind, **facts) for op in ops}


_CPU_FLASH = Attention(False, (0, 1, 2), (0, 1), 2, 0, (3, "dropout_p"), (None, "attn_mask"))
_CPU_FLASH_BWD = Attention(True, (0, 1, 2, 3, 4, 5), (0, 1, 2), 3, 1, (6, "dropout_p"), (None, "attn_mask"))
_FLASH = Attention(False, (0, 1, 2), (0, 1), 9, 0, (3, "dropout_p"))
_FLASH_BWD = Attention(True, (0, 1, 2, 3, 4, 5), (0, 1, 2), 3, 1, (10, "dropout_p"))
_EFFICIENT = Attention(False, (0, 1, 2), (0, 1), 4, 0, (5, "dropout_p"), (3, "attn_bias"))
_EFFICIENT_BWD = Attention(True, (0, 1, 2, 3, 5, 6), (0, 1, 2), 4, 1, (9, "dropout_p"), (4, "attn_bias"), bias_grad=3)
_CUDNN = Attention(False, (0, 1, 2), (0, 1), 9, 0, (5, "dropout_p"), (3, "attn_bias"))
_CUDNN_BWD = Attention(True, (0, 1, 2, 3, 4, 5), (0, 1, 2), 3, 1, (13, "dropout_p"), (8, "attn_bias"))
_FUSED = Attention(False, (0, 1, 2), (0, 1), 9, 0, (4, "dropout_p"), (3, "attn_bias"))
_FUSED_BWD = Attention(True, (0, 1, 2, 3, 6, 7), (0, 1, 2), 4, 1, (12, "dropout_p"), (4, "attn_bias"), bias_grad=3)


def _attention_rows() -> dict[Any, OpFacts]:
    names = {
        "_scaled_dot_product_flash_attention_for_cpu": (_CPU_FLASH, _CPU_FLASH_BWD),
        "_scaled_dot_product_flash_attention": (_FLASH, _FLASH_BWD),
        "_scaled_dot_product_efficient_attention": (_EFFICIENT, _EFFICIENT_BWD),
        "_scaled_dot_product_cudnn_attention": (_CUDNN, _CUDNN_BWD),
        "_scaled_dot_product_fused_attention_overrideable": (_FUSED, _FUSED_BWD),
    }
    rows: dict[Any, OpFacts] = {}
    for name, (fwd, bwd) in names.items():
        for suffix, layout in (("", fwd), ("_backward", bwd)):
            packet = getattr(aten, name + suffix, None)  # a build may lack a kernel's ops
            if packet is not None:
                rows[packet.default] = OpFacts(ATTENTION, tp="heads", attention=layout)
    return rows


OPS: dict[Any, OpFacts] = {
    # pointwise with a tensor-parallel rule (shards pass through; see tp_rules._pointwise)
    **_rows(
        POINTWISE,
        [
            aten.add.Tensor,
            aten.sub.Tensor,
            aten.mul.Tensor,
            aten.div.Tensor,
            aten.gelu.default,
            aten.gelu_backward.default,
            aten.tanh.default,
            aten.neg.default,
            aten.exp.default,
            aten.rsqrt.default,
            aten.relu.default,
            aten.silu.default,
            aten.sigmoid.default,
            aten.clone.default,
            aten._to_copy.default,
            aten.ones_like.default,
            aten.zeros_like.default,
            aten.pow.Tensor_Scalar,
            aten.threshold_backward.default,
            aten.where.self,
            aten.tanh_backward.default,
            aten.silu_backward.default,
            aten.sigmoid_backward.default,
        ],
        tp="pointwise",
    ),  # fmt: skip
    aten.detach.default: OpFacts(POINTWISE, alias=True, tp="pointwise"),
    aten.alias.default: OpFacts(POINTWISE, alias=True, tp="pointwise"),
    # pointwise ops whose scalars are arguments, casts and comparisons: the same rule
    **_rows(
        POINTWISE,
        [
            aten.add.Scalar,
            aten.sub.Scalar,
            aten.rsub.Scalar,
            aten.mul.Scalar,
            aten.div.Scalar,
            aten.pow.Tensor_Tensor,
            aten.log.default,
            aten.sqrt.default,
            aten.reciprocal.default,
            aten.abs.default,
            aten.erf.default,
            aten.cos.default,
            aten.sin.default,
            aten.maximum.default,
            aten.minimum.default,
            aten.ne.Scalar,
            aten.ne.Tensor,
            aten.eq.Scalar,
            aten.eq.Tensor,
            aten.gt.Scalar,
            aten.gt.Tensor,
            aten.lt.Scalar,
            aten.lt.Tensor,
            aten.ge.Scalar,
            aten.le.Scalar,
            aten.bitwise_not.default,
            aten.logical_not.default,
            aten.full_like.default,
            aten.native_dropout_backward.default,
            aten.masked_fill.Scalar,
            aten.copy.default,
            torch.ops.prims.convert_element_type.default,
        ],
        tp="pointwise",
    ),  # fmt: skip
    # random: a shard would draw a different mask than the whole tensor does (no rule: run whole)
    aten.native_dropout.default: OpFacts(POINTWISE),
    # views
    aten.view.default: OpFacts(VIEW, alias=True, tp="view"),
    aten._unsafe_view.default: OpFacts(VIEW, alias=True, tp="view"),
    aten.reshape.default: OpFacts(VIEW, alias=True, tp="view"),
    aten.t.default: OpFacts(VIEW, alias=True, tp="permute"),
    aten.transpose.int: OpFacts(VIEW, alias=True, tp="permute"),
    aten.permute.default: OpFacts(VIEW, alias=True, tp="permute"),
    aten.split.Tensor: OpFacts(VIEW, alias=True, tp="split"),
    aten.split_with_sizes.default: OpFacts(VIEW, alias=True, tp="split"),
    **_rows(
        VIEW,
        [
            aten.expand.default,
            aten.unsqueeze.default,
            aten.squeeze.default,
            aten.squeeze.dim,
            aten.squeeze.dims,
            aten.slice.Tensor,
            aten.select.int,
        ],
        alias=True,
        tp="dims",
    ),  # fmt: skip
    aten.unbind.int: OpFacts(VIEW, alias=True, tp="unbind"),  # a fused q|k|v taken apart (Falcon)
    aten.as_strided.default: OpFacts(VIEW, alias=True),
    # the gradients of slice and select: zeros around the incoming gradient (a new tensor)
    aten.slice_backward.default: OpFacts(OTHER, tp="dims"),
    aten.select_backward.default: OpFacts(OTHER, tp="dims"),
    collectives.WAIT: OpFacts(OTHER, alias=True),  # returns the async collective's buffer
    collectives.ALL_REDUCE_START_: OpFacts(OTHER, alias=True),  # reduces its input in place
    operator.getitem: OpFacts(VIEW, tp="getitem"),  # picks one output of a multi-output op
    aten.cat.default: OpFacts(OTHER, tp="cat"),
    aten.stack.default: OpFacts(OTHER, tp="stack"),  # unbind's gradient
    # reductions
    aten.sum.dim_IntList: OpFacts(REDUCTION, tp="sum"),
    aten.sum.default: OpFacts(REDUCTION, tp="sum"),
    **_rows(
        REDUCTION,
        [
            aten.amax.default,
            aten.amin.default,
            aten.mean.dim,
            aten.var_mean.correction,
            aten._softmax.default,
            aten._safe_softmax.default,
            aten._softmax_backward_data.default,
        ],
        tp="reduce",
    ),  # fmt: skip
    # matmuls
    aten.mm.default: OpFacts(MATMUL, tp="matmul"),
    aten.addmm.default: OpFacts(MATMUL, tp="matmul"),
    aten.bmm.default: OpFacts(MATMUL, tp="bmm"),
    aten.baddbmm.default: OpFacts(MATMUL),
    # norms
    aten.native_layer_norm.default: OpFacts(NORM, tp="layer_norm"),
    aten.native_layer_norm_backward.default: OpFacts(NORM, tp="layer_norm_backward"),
    **_rows(NORM, [aten._native_batch_norm_legit_functional.default, aten.native_batch_norm_backward.default]),
    aten.scalar_tensor.default: OpFacts(CREATE),
    aten.lift_fresh_copy.default: OpFacts(CREATE),
    aten.gather.default: OpFacts(OTHER),
    aten.scatter.value: OpFacts(OTHER),
    aten.scatter.src: OpFacts(OTHER),
    aten.logical_and.default: OpFacts(POINTWISE, tp="pointwise"),
    # vocab-parallel (passes/tp_vocab.py) when the classes are split, else their ordinary rules
    aten._log_softmax.default: OpFacts(REDUCTION, tp="log_softmax"),
    aten._log_softmax_backward_data.default: OpFacts(REDUCTION, tp="log_softmax_backward"),
    aten.nll_loss_forward.default: OpFacts(REDUCTION, tp="nll_loss"),
    aten.nll_loss_backward.default: OpFacts(OTHER, tp="nll_loss_backward"),
    aten.embedding.default: OpFacts(EMBEDDING, tp="embedding"),
    aten.embedding_dense_backward.default: OpFacts(EMBEDDING, tp="embedding_backward"),
    **_attention_rows(),
}

ALIAS_OPS = frozenset(op for op, f in OPS.items() if f.alias)
UNKNOWN = OpFacts(OTHER)


def facts(target: Any) -> OpFacts:
    """The row of `target` (an OpOverload or operator.getitem); ops without a row are OTHER, no rule."""
    return OPS.get(target, UNKNOWN)


def of_kind(*kinds: str) -> frozenset[Any]:
    return frozenset(op for op, f in OPS.items() if f.kind in kinds)


def with_tp_rule(rule: str) -> frozenset[Any]:
    return frozenset(op for op, f in OPS.items() if f.tp == rule)


def attention(target: Any) -> Attention | None:
    return facts(target).attention


def is_random(node: fx.Node) -> bool:
    """Whether running the node twice may give different values: torch's nondeterministic_seeded tag,
    except attention, which is random only with dropout (its kernels carry the tag regardless)."""
    if node.op != "call_function":
        return False
    layout = attention(node.target)
    if layout is not None:
        return layout.dropout_p(node) != 0.0
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags


def recomputable(node: fx.Node) -> bool:
    """Whether the op may be run again for the backward with bit-identical results: not random, no collective."""
    if node.op != "call_function" or collectives.is_collective(node) or collectives.is_wait(node):
        return False
    return not is_random(node)
