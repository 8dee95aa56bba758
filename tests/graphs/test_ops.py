"""The op-facts table (graphs/ops.py) against torch's own op schemas, and against its readers."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from shardfx.graphs import ops
from shardfx.graphs.cost_model import node_flops
from shardfx.kernels import rules as kernel_rules
from shardfx.passes import tp_rules

aten = torch.ops.aten
KERNELS = [
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
]
ATTENTION_OPS = [getattr(aten, k + s).default for k in KERNELS for s in ("", "_backward")]


@pytest.mark.parametrize("op", ATTENTION_OPS, ids=str)
def test_every_attention_layout_matches_the_ops_schema(op) -> None:  # type: ignore[no-untyped-def]
    layout = ops.attention(op)
    assert layout is not None and ops.facts(op).kind == ops.ATTENTION and ops.facts(op).tp == "heads"
    schema = op._schema
    args = schema.arguments
    assert layout.backward == str(op).endswith("_backward.default")
    assert len(schema.returns) == layout.n_out
    for i in layout.heads_in:  # tensors of (B, H, L, D) / (B, H, L): never scalars or options
        assert str(args[i].type) == "Tensor", (i, args[i])
    assert args[layout.query].name in ("query", "q")
    assert args[layout.query + 1].name in ("key", "k")
    for i in layout.heads_out:
        assert str(schema.returns[i].type) == "Tensor"
    pos, name = layout.dropout
    assert args[pos].name == name == "dropout_p"
    if layout.mask is not None:
        pos, name = layout.mask
        found = next(a for a in args if a.name == name)
        assert pos is None or args[pos] is found
        assert pos is not None or found.kwarg_only
    else:
        assert not any(a.name in ("attn_mask", "attn_bias") for a in args)


def test_every_op_a_reader_has_a_rule_for_has_a_row() -> None:
    readers = {
        "tensor-parallel rules": set(tp_rules.RULES),
        "kernel lowering": set(kernel_rules.RULES) | set(kernel_rules.DECOMPOSE),
    }
    for who, targets in readers.items():
        missing = sorted(str(t) for t in targets if t not in ops.OPS)
        assert missing == [], who


def _attention_node(op, q_shape, k_shape, args_after):  # type: ignore[no-untyped-def]
    graph = fx.Graph()
    mode = FakeTensorMode()
    with mode:
        q, k = torch.empty(q_shape), torch.empty(k_shape)
    nodes = []
    for name, val in (("q", q), ("k", k), ("v", k)):
        n = graph.placeholder(name)
        n.meta["val"] = val
        nodes.append(n)
    return graph.call_function(op, (*nodes, *args_after))


def test_cost_model_and_recompute_read_the_cuda_kernels_too() -> None:
    b, h, lq, lk, d = 2, 4, 8, 16, 32
    flash = _attention_node(aten._scaled_dot_product_flash_attention.default, (b, h, lq, d), (b, h, lk, d), (0.0,))
    assert node_flops(flash) == 4 * b * h * lq * lk * d
    # memory-efficient attention: attn_bias at 3, compute_log_sumexp at 4, dropout_p at 5
    eff = aten._scaled_dot_product_efficient_attention.default
    deterministic = _attention_node(eff, (b, h, lq, d), (b, h, lk, d), (None, True, 0.0))
    dropout = _attention_node(eff, (b, h, lq, d), (b, h, lk, d), (None, True, 0.1))
    assert not ops.is_random(deterministic) and ops.recomputable(deterministic)
    assert ops.is_random(dropout) and not ops.recomputable(dropout)
    assert node_flops(deterministic) == 4 * b * h * lq * lk * d


def test_random_ops_are_never_fused() -> None:
    node = _attention_node(aten._scaled_dot_product_efficient_attention.default, (1, 1, 2, 2), (1, 1, 2, 2),
                           (None, True, 0.5))  # fmt: skip
    assert kernel_rules.rule(node) is None
    assert ops.is_random(node)
