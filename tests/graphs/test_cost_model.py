"""The cost model: roofline compute, alpha-beta collectives, and what overlap hides."""

from __future__ import annotations

import pytest

import shardfx
from shardfx.graphs import collectives
from shardfx.graphs.cost_model import PROFILES, hardware, node_flops, simulate
from shardfx.models import gpt_loss
from tests.fixtures import gpt_batch, tiny_gpt


def compiled(**config):
    engine = shardfx.compile_distributed(
        tiny_gpt(), 4, example_inputs=gpt_batch(), loss_fn=gpt_loss, config=shardfx.Config(**config)
    )
    engine.runtime.close()
    return engine.program


def test_matmul_flops_follow_the_formula() -> None:
    program = compiled()
    # tiny GPT, 3 sequences of 16 tokens per rank, d_model 32: qkv projection is (48, 32) @ (32, 96)
    mms = [
        n for n in program.graph.nodes if n.name.startswith(("mm", "addmm")) and n.meta["shardfx.phase"] == "forward"
    ]
    qkv = next(n for n in mms if tuple(n.meta["val"].shape) == (48, 96))
    assert node_flops(qkv) == 2 * 48 * 32 * 96


def test_synchronous_collectives_are_all_exposed() -> None:
    sim = simulate(compiled(zero_stage=3), hardware("h100"))
    assert sim.exposed_comm_seconds == pytest.approx(sim.comm_seconds)
    assert sim.step_seconds == pytest.approx(sim.compute_seconds + sim.comm_seconds)


@pytest.mark.parametrize("hw", sorted(PROFILES))
def test_overlap_hides_communication(hw: str) -> None:
    plain = simulate(compiled(zero_stage=3, bucket_mb=64.0), hardware(hw))
    overlapped = simulate(compiled(zero_stage=3, bucket_mb=64.0, overlap=True), hardware(hw))
    assert overlapped.comm_seconds == pytest.approx(plain.comm_seconds)
    assert overlapped.exposed_comm_seconds < plain.exposed_comm_seconds
    assert overlapped.step_seconds < plain.step_seconds


def test_bucketing_saves_latency() -> None:
    plain = compiled(zero_stage=3)
    bucketed = compiled(zero_stage=3, bucket_mb=64.0)
    hw = hardware("h100")
    n_plain = sum(collectives.is_collective(n) for n in plain.graph.nodes)
    n_bucketed = sum(collectives.is_collective(n) for n in bucketed.graph.nodes)
    saved = (n_plain - n_bucketed) * hw.alpha
    assert simulate(plain, hw).comm_seconds - simulate(bucketed, hw).comm_seconds == pytest.approx(saved, rel=1e-6)


def test_unknown_profile() -> None:
    with pytest.raises(ValueError, match="unknown hardware profile 'tpu'; known:"):
        hardware("tpu")
