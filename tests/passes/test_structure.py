"""Structure of the rewritten graphs against the formulas: collective counts, placement, bytes, memory."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import shardfx
from shardfx.graphs import collectives, meta
from shardfx.graphs.signature import GRAD
from shardfx.models import gpt_loss
from tests.fixtures import UNPLANNED, FrozenFirst, gpt_batch, mlp_batch, tiny_gpt


def compile_gpt(world_size: int, **config):
    return shardfx.compile_distributed(
        tiny_gpt(),
        world_size,
        example_inputs=gpt_batch(),
        loss_fn=gpt_loss,
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        config=shardfx.Config(**{**UNPLANNED, **config}),
    )


def collective_nodes(engine, kind: str, role: str | None = None):
    return [
        n
        for n in engine.program.graph.nodes
        if collectives.is_collective(n)
        and collectives.kind(n) == kind
        and (role is None or n.meta.get(meta.ROLE) == role)
    ]


def param_bytes(engine, padded: bool) -> int:
    total = 0
    for spec in engine.program.signature.params():
        shard = engine.program.shard_specs.get(spec.name)
        val_numel = math.prod(shard.full_shape) if shard else None
        if shard is None:
            numel = (
                engine.program.placeholders()[engine.program.signature.input_index("param", spec.name)]
                .meta["val"]
                .numel()
            )
        else:
            numel = math.prod(shard.shard_shape) * shard.world if padded else val_numel
        total += numel * 4
    return total


def test_data_parallel_one_all_reduce_per_trainable_param_right_after_its_gradient() -> None:
    engine = compile_gpt(2)
    reduces = collective_nodes(engine, "all_reduce", "grad_sync")
    trainable = [s.name for s in engine.program.signature.params(trainable_only=True)]
    assert sorted(n.meta[meta.TARGET] for n in reduces) == sorted(trainable)
    for node in reduces:
        assert node.prev is node.args[0], f"{node.name} is not right after the node producing its gradient"
        assert node.args[1:] == ("dp", "avg")
    assert len(collective_nodes(engine, "all_reduce")) == len(trainable)  # the loss mean rides on the last one


def test_frozen_params_get_no_reduction() -> None:
    engine = shardfx.compile_distributed(
        FrozenFirst(), 2, example_inputs=mlp_batch(), loss_fn=F.mse_loss, config=shardfx.Config(**UNPLANNED)
    )
    assert {n.meta[meta.TARGET] for n in collective_nodes(engine, "all_reduce", "grad_sync")} == {
        "head.weight",
        "head.bias",
    }


def _backward_reads(engine) -> set[str]:
    """Parameters whose backward gather exists (the backward reads them)."""
    return {
        n.meta[meta.TARGET]
        for n in collective_nodes(engine, "all_gather", "param_gather")
        if n.meta[meta.PHASE] == meta.BACKWARD
    }


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_zero3_gathers_twice_reduces_once_and_moves_3x_param_bytes(world_size: int) -> None:
    engine = compile_gpt(world_size, zero_stage=3)
    names = [s.name for s in engine.program.signature.params()]
    gathers = collective_nodes(engine, "all_gather", "param_gather")
    per_param = {name: [g for g in gathers if g.meta[meta.TARGET] == name] for name in names}
    read_in_backward = _backward_reads(engine)
    # Only the position embedding is not read by the backward (embedding_dense_backward needs no weight).
    assert set(names) - read_in_backward == {"wpe.weight"}
    for name, nodes in per_param.items():
        phases = [n.meta[meta.PHASE] for n in nodes]
        assert phases == ([meta.FORWARD, meta.BACKWARD] if name in read_in_backward else [meta.FORWARD]), name
    rs = collective_nodes(engine, "reduce_scatter", "grad_sync")
    assert sorted(n.meta[meta.TARGET] for n in rs) == sorted(names)
    # Traffic of one step, measured by the communicator, against the ZeRO formula:
    # forward gather + backward gather + reduce-scatter = 3x the (padded) parameter bytes,
    # less one gather of the parameters the backward never reads.
    engine.train_step(*gpt_batch())
    volume = engine.stats()["comm"]["volume"]
    padded = param_bytes(engine, padded=True)
    skipped = 4 * math.prod(engine.program.shard_specs["wpe.weight"].shard_shape) * world_size
    assert volume["all_gather"] == 2 * padded - skipped
    assert volume["reduce_scatter"] == padded


def test_zero3_without_resharding_moves_2x() -> None:
    engine = compile_gpt(4, zero_stage=3, reshard_after_forward=False)
    assert not _backward_reads(engine)
    engine.train_step(*gpt_batch())
    volume = engine.stats()["comm"]["volume"]
    padded = param_bytes(engine, padded=True)
    assert volume["all_gather"] == padded and volume["reduce_scatter"] == padded


@pytest.mark.parametrize("stage", [1, 2])
def test_zero12_move_2x_and_differ_in_where_gradients_reduce(stage: int) -> None:
    engine = compile_gpt(4, zero_stage=stage)
    engine.train_step(*gpt_batch())
    volume = engine.stats()["comm"]["volume"]
    padded = param_bytes(engine, padded=True)
    assert volume["all_gather"] == padded and volume["reduce_scatter"] == padded
    rs = collective_nodes(engine, "reduce_scatter", "grad_sync")
    nodes = list(engine.program.graph.nodes)
    if stage == 1:  # all after the whole backward
        last_backward = max(i for i, n in enumerate(nodes) if n.meta.get(meta.ORIGIN) == "capture")
        assert min(nodes.index(n) for n in rs) > last_backward
    else:  # each right after its gradient: producer, (padding), reduce_scatter are consecutive
        for n in rs:
            value = n.args[0]
            assert n.prev is value, n.name
            if value.target is torch.ops.aten.constant_pad_nd.default:
                assert value.prev is value.args[0], n.name


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_per_rank_state_bytes_are_numel_over_n_padded(stage: int, world_size: int) -> None:
    engine = compile_gpt(world_size, zero_stage=stage)
    engine.train_step(*gpt_batch())
    padded = param_bytes(engine, padded=True)
    full = param_bytes(engine, padded=False)
    for rank in range(world_size):
        mem = engine.runtime.memory(rank)
        assert mem["params"] == padded // world_size
        assert mem["grads"] == padded // world_size
        assert mem["optimizer"] == 2 * padded // world_size  # AdamW: exp_avg and exp_avg_sq
        # within one padding row per parameter of the unpadded figure
        assert (
            0
            <= mem["params"] - full / world_size
            <= sum(4 * math.prod(s.shard_shape[1:]) for s in engine.program.shard_specs.values())
        )


def test_gradient_outputs_are_shards_under_zero3() -> None:
    engine = compile_gpt(4, zero_stage=3)
    outputs = engine.program.outputs()
    for spec, value in zip(engine.program.signature.outputs, outputs):
        if spec.role == GRAD:
            shard = engine.program.shard_specs[spec.target]
            assert tuple(value.meta["val"].shape) == shard.shard_shape


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_the_gradient_norm_and_the_loss_add_no_round_trip(stage: int) -> None:
    """No scalar collective of their own: ZeRO-0's gradients are whole on every rank, so the norm is
    local, and the loss's mean rides on the last gradient all-reduce (one element more); ZeRO-1/2/3's
    norm sums its shards' squares across the ranks in one all-reduce, which carries the loss too."""
    engine = compile_gpt(4, zero_stage=stage)
    engine.runtime.close()
    reduces = [
        n for n in engine.program.graph.nodes if collectives.is_collective(n) and collectives.kind(n) == "all_reduce"
    ]
    scalars = [n for n in reduces if n.args[0].meta["val"].numel() <= 2]
    assert collective_nodes(engine, "all_reduce", meta.LOSS_SYNC) == []
    if stage == 0:
        assert scalars == []
        # one all-reduce per gradient, the last of them one element longer: the loss
        assert (
            sum(n.args[0].meta["val"].numel() for n in reduces) == sum(p.numel() for p in tiny_gpt().parameters()) + 1
        )
        assert len(reduces) == len(list(tiny_gpt().parameters()))
    else:
        assert len(scalars) == 1 and scalars[0].args[0].meta["val"].shape == (2,)  # squared norm, local loss
