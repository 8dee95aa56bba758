"""tensor_parallel: Megatron-style splits found by propagation, exact against eager, composable with ZeRO."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shardfx
from shardfx.graphs import collectives, meta
from shardfx.models import GPT, GPTConfig, gpt_loss
from tests.fixtures import gpt_batch, mlp_batch
from tests.parity_util import assert_parity


def gpt(bias: bool = False, n_head: int = 4) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, n_layer=2, d_model=32, n_head=n_head, seq_len=16, bias=bias))


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


@pytest.mark.parametrize("tp", [2, 4])
def test_gpt_tensor_parallel_matches_eager(tp: int) -> None:
    engine = assert_parity(gpt(), gpt_batch(), gpt_loss, tp, shardfx.Config(tp_size=tp))
    stats = next(r.stats for r in engine.pass_records if r.name == "tensor_parallel")
    assert stats["plan"]["blocks.0.attn.qkv"] == "colwise" and stats["plan"]["blocks.0.attn.proj"] == "rowwise"
    assert stats["plan"]["blocks.1.mlp.fc"] == "colwise" and stats["plan"]["blocks.1.mlp.proj"] == "rowwise"
    assert not stats["fallback_ops"] and not stats["left_replicated"]


def test_biases_split_colwise_and_added_once_rowwise() -> None:
    """SGD: with biases, AdamW would amplify the key bias's zero gradient (see the data-parallel tests)."""
    assert_parity(gpt(bias=True), gpt_batch(), gpt_loss, 2, shardfx.Config(tp_size=2), optimizer=sgd)


def test_dp_x_tp_with_zero3() -> None:
    assert_parity(gpt(), gpt_batch(), gpt_loss, 4, shardfx.Config(tp_size=2, zero_stage=3))


@pytest.mark.parametrize("stage", [0, 3])
def test_clipping_with_tensor_parallelism_counts_every_slice_once(stage: int) -> None:
    """The clip norm sums tp slices over tp, ZeRO shards over dp, replicated gradients once (SGD: see test_grad_clipping)."""
    config = shardfx.Config(tp_size=2, zero_stage=stage, grad_clip=0.05)
    engine = assert_parity(gpt(), gpt_batch(), gpt_loss, 4, config, optimizer=sgd)
    reference = gpt()
    gpt_loss(reference(gpt_batch()[0]), gpt_batch()[1]).backward()
    eager_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), float("inf"))
    fresh = shardfx.compile_distributed(
        gpt(), 4, example_inputs=gpt_batch(), loss_fn=gpt_loss, optimizer=sgd, config=config
    )
    fresh.train_step(*gpt_batch())
    assert fresh.stats()["grad_norm"] == pytest.approx(float(eager_norm), rel=1e-5)  # before clipping, as torch's
    assert fresh.stats()["grad_norm"] > 0.05 and engine.stats()["grad_norm"] is not None


def tp_collectives(engine) -> list:
    return [n for n in engine.program.graph.nodes if collectives.is_collective(n) and n.meta.get(meta.ROLE) == "tp"]


def test_megatron_all_reduce_count_and_bytes_per_rank() -> None:
    engine = shardfx.compile_distributed(
        gpt(), 2, example_inputs=gpt_batch(), loss_fn=gpt_loss, config=shardfx.Config(tp_size=2)
    )
    engine.runtime.close()
    per_block = {}
    for node in tp_collectives(engine):
        assert collectives.kind(node) == "all_reduce"
        if not node.meta[meta.MODULE].startswith("blocks."):
            continue  # the vocab-parallel embedding and loss (tests/parity/test_hf_tensor_parallel.py)
        block = node.meta[meta.MODULE].split(".")[1]
        per_block.setdefault(block, []).append(node.meta[meta.PHASE])
    for phases in per_block.values():  # 2 in forward (after the rowwise outputs), 2 in backward (colwise inputs)
        assert sorted(phases) == ["backward", "backward", "forward", "forward"]
    assert len(per_block) == 2
    full = dict(gpt().named_parameters())
    for rank in range(2):
        params = engine.runtime.states[rank].params
        for name in engine.program.tp_specs:
            assert params[name].numel() * 2 == full[name].numel(), name
        assert "blocks.0.attn.qkv.weight" in engine.program.tp_specs
        assert engine.program.tp_specs["wte.weight"].dim == 0  # vocab-parallel, tied to the head


def test_user_plan() -> None:
    plan = {"*.mlp.fc": "colwise", "*.mlp.proj": "rowwise"}
    engine = assert_parity(gpt(), gpt_batch(), gpt_loss, 2, shardfx.Config(tp_size=2, tp_plan=plan))
    assert set(engine.program.tp_specs) == {f"blocks.{i}.mlp.{m}.weight" for i in (0, 1) for m in ("fc", "proj")}


def test_user_plan_with_an_impossible_split_names_module_and_sizes() -> None:
    with pytest.raises(
        shardfx.PassError,
        match=r"blocks.0.attn.qkv: colwise needs out_features 96 divisible by tp=3 in each of its 3 parts",
    ):
        shardfx.compile_distributed(
            gpt(),
            3,
            example_inputs=gpt_batch(),
            loss_fn=gpt_loss,
            config=shardfx.Config(tp_size=3, tp_plan={"*.qkv": "colwise"}),
        )


def test_auto_plan_leaves_what_does_not_divide_replicated() -> None:
    """tp=3 with 4 heads: the attention pair cannot split; the MLP (128 = 3 x 42.7) neither: exact all the same."""
    engine = assert_parity(gpt(n_head=4), gpt_batch(), gpt_loss, 3, shardfx.Config(tp_size=3))
    stats = next(r.stats for r in engine.pass_records if r.name == "tensor_parallel")
    assert set(stats["plan"].values()) == {"replicate"}


class CumsumMLP(nn.Module):
    """An op with no sharding rule (cumsum over the split features) between a colwise and a rowwise layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.proj = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cumsum(torch.tanh(self.fc(x)), dim=-1))


def test_op_without_a_rule_falls_back_exactly() -> None:
    torch.manual_seed(0)
    config = shardfx.Config(tp_size=2, tp_plan={"fc": "colwise", "proj": "rowwise"})
    engine = assert_parity(CumsumMLP(), mlp_batch(), F.mse_loss, 2, config)
    stats = next(r.stats for r in engine.pass_records if r.name == "tensor_parallel")
    assert "aten.cumsum.default" in stats["fallback_ops"]
    assert stats["tp_all_gathers"] >= 1


def rule_on(fn, *shapes, placements, target=None):  # type: ignore[no-untyped-def]
    """The tp rule's decision for the last op (or the last `target`) of fn traced on tensors of
    `shapes` (inputs' placements given)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from shardfx.passes.tp_rules import RULES

    gm = make_fx(fn, tracing_mode="fake")(*[torch.randn(s) for s in shapes])
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    node = [n for n in gm.graph.nodes if n.op == "call_function" and target in (None, n.target)][-1]
    return RULES[node.target](node, dict(zip(inputs, placements)), 2)


def test_rules_where_a_split_does_not_carry() -> None:
    from shardfx.graphs.placement import Partial, Replicate, Shard

    # a constant added to a partial sum would be added once per rank: summed first
    decision = rule_on(lambda x: x + 1.0, (4, 6), placements=[Partial()])
    assert decision.out == Replicate() and decision.want
    # parts of unequal size are no equal blocks
    decision = rule_on(lambda a, b: torch.cat([a, b], 1), (4, 8), (4, 4), placements=[Shard(1), Shard(1)])
    assert not isinstance(decision.out, Shard)
    # a sum over every dim (dim=[]) of a shard is a partial sum
    decision = rule_on(lambda x: torch.ops.aten.sum.dim_IntList(x, []), (4, 6), placements=[Shard(1)])
    assert decision.out == Partial()


class UnbindAttention(nn.Module):
    """Falcon's attention (transformers >= 5.25): one fused q|k|v Linear viewed as (B, L, H, 3, D) and
    taken apart with unbind; its gradient is a stack."""

    def __init__(self, heads: int = 4, dim: int = 32) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.dense = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, self.heads, 3, d // self.heads).unbind(dim=3)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.dense(out.transpose(1, 2).reshape(b, n, d))


def test_a_fused_projection_taken_apart_with_unbind_splits_by_heads() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(4, 6, 32), torch.randn(4, 6, 32)
    engine = assert_parity(UnbindAttention(), (x, y), F.mse_loss, 2, shardfx.Config(tp_size=2), optimizer=sgd)
    stats = next(r.stats for r in engine.pass_records if r.name == "tensor_parallel")
    assert stats["plan"] == {"qkv": "colwise", "dense": "rowwise"}, stats["reasons"]
    assert not stats["fallback_ops"] and not stats["left_replicated"]
    assert engine.runtime.states[0].params["qkv.weight"].shape == (48, 32)


def test_unbind_and_stack_rules() -> None:
    from shardfx.graphs.placement import Partial, Replicate, Shard

    unbind = torch.ops.aten.unbind.int
    # along another dim every part keeps the shard, one dim fewer before it
    decision = rule_on(lambda x: torch.unbind(x, 1), (4, 3, 8), placements=[Shard(2)], target=unbind)
    assert decision.out == (Shard(1), Shard(1), Shard(1))
    # along the sharded dim each part would be one rank's: the input is gathered
    decision = rule_on(lambda x: torch.unbind(x, 1), (4, 2, 8), placements=[Shard(1)], target=unbind)
    assert decision.out == (Replicate(), Replicate()) and decision.want
    # stack: the inverse; parts split differently cannot stay split
    decision = rule_on(lambda a, b: torch.stack([a, b], 1), (4, 8), (4, 8), placements=[Shard(1), Shard(1)])
    assert decision.out == Shard(2)
    decision = rule_on(lambda a, b: torch.stack([a, b], 0), (4, 8), (4, 8), placements=[Partial(), Partial()])
    assert decision.out == Partial()
    decision = rule_on(lambda a, b: torch.stack([a, b], 0), (4, 8), (4, 8), placements=[Shard(0), Shard(1)])
    assert decision.out == Replicate() and decision.want
