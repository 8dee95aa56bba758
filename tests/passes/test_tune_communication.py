"""tune_communication: the cost model picks bucket size, overlap and prefetch depth; exact; the memory cap holds;
what the Config sets is kept; it is in the default pipeline."""

from __future__ import annotations

import pytest
import torch

import shardfx
from shardfx.graphs import collectives
from shardfx.graphs.analysis import memory_timeline
from shardfx.graphs.cost_model import hardware, simulate
from shardfx.models import gpt_loss
from shardfx.passes.tune_communication import TOLERANCE
from tests.fixtures import gpt_batch, tiny_gpt
from tests.parity_util import shardfx_train


def tuned(**config):
    losses, state, engine = shardfx_train(
        tiny_gpt(),
        gpt_batch(),
        gpt_loss,
        2,
        4,
        shardfx.Config(**{"zero_stage": 3, "tune_communication": True, **config}),
    )
    return losses, state, engine, next(r.stats for r in engine.pass_records if r.name == "tune_communication")


def test_picks_the_fastest_simulated_schedule_and_stays_exact() -> None:
    plain = shardfx.Config(zero_stage=3, bucket_mb=0, overlap=False)  # no bucketing, no overlap
    base_losses, base_state, _ = shardfx_train(tiny_gpt(), gpt_batch(), gpt_loss, 2, 4, plain)
    losses, state, engine, stats = tuned(hardware="h100")
    assert torch.equal(losses, base_losses)
    assert all(torch.equal(state[k], v) for k, v in base_state.items())
    fastest = min(row["step_ms"] for row in stats["table"])
    plan = ("bucket_mb", "prefetch", "within_depth1_peak")
    chosen = next(r for r in stats["table"] if all(r[k] == stats[k] for k in plan))
    # as fast as the model can tell (within TOLERANCE), and of those the smallest peak
    tied = [r for r in stats["table"] if r["step_ms"] <= fastest * (1 + TOLERANCE) + 1e-3]
    assert chosen in tied and chosen["peak_bytes"] == min(r["peak_bytes"] for r in tied)
    assert simulate(engine.program, hardware("h100")).step_seconds * 1e3 == pytest.approx(chosen["step_ms"], abs=1e-3)


def test_memory_cap_is_respected() -> None:
    _, _, _, free = tuned(hardware="h100")
    cap = min(row["peak_bytes"] for row in free["table"])  # only the leanest schedules fit
    _, _, engine, capped = tuned(hardware="h100", comm_memory_cap=cap)
    assert memory_timeline(engine.program).peak <= cap
    assert all(row["fits"] == (row["peak_bytes"] <= cap) for row in capped["table"])
    assert any(not row["fits"] for row in capped["table"]), "the cap must exclude something to mean anything"


def test_impossible_cap_is_a_clear_error() -> None:
    with pytest.raises(shardfx.PassError, match="no bucket size / prefetch depth keeps the peak under the memory cap"):
        tuned(comm_memory_cap=1024)


def _pipeline_names(**config) -> list[str]:
    from shardfx.driver import build_mesh
    from shardfx.passes.pipeline import pipeline

    cfg = shardfx.Config(**config)
    return [p.name for p in pipeline(cfg, build_mesh(cfg, 2))]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_the_default_pipeline_plans_communication(stage: int) -> None:
    assert "tune_communication" in _pipeline_names(zero_stage=stage)
    # everything set by hand: the passes as set, nothing planned
    names = _pipeline_names(zero_stage=stage, bucket_mb=8, overlap=True, prefetch=2)
    assert "tune_communication" not in names and names[-2:] == ["bucket_collectives", "schedule_overlap"]
    assert not {"tune_communication", "bucket_collectives", "schedule_overlap"} & set(
        _pipeline_names(zero_stage=stage, bucket_mb=0, overlap=False)
    )


def test_settings_given_are_kept_and_the_rest_planned() -> None:
    _, _, _, stats = tuned(hardware="h100")
    assert {row["overlap"] for row in stats["table"]} == {True, False}
    _, _, _, kept = tuned(hardware="h100", tune_communication=False, bucket_mb=1.0, overlap=True)
    assert {row["bucket_mb"] for row in kept["table"]} == {1.0}
    assert all(row["overlap"] for row in kept["table"]) and kept["bucket_mb"] == 1.0
    assert {row["prefetch"] for row in kept["table"]} == {1, 2, 3}  # the depth is still planned
    _, _, engine, off = tuned(hardware="h100", tune_communication=False, overlap=False)
    assert not any(row["overlap"] for row in off["table"]) and off["prefetch"] is None
    assert not any(collectives.is_wait(n) for n in engine.program.graph.nodes)


def test_bucket_caps_that_group_alike_are_one_candidate() -> None:
    _, _, _, stats = tuned(hardware="h100", tune_communication=False, overlap=False)
    # tiny_gpt holds a few KiB: every cap from 1 MiB up groups its collectives alike
    assert sorted(row["bucket_mb"] for row in stats["table"]) == [0.0, 1.0]


def test_config_rejects_bad_communication_settings() -> None:
    with pytest.raises(ValueError, match="bucket_mb must be a number >= 0"):
        shardfx.Config(bucket_mb=-1)
    with pytest.raises(TypeError, match="overlap must be a bool or None"):
        shardfx.Config(overlap="yes")
    with pytest.raises(ValueError, match="prefetch must be an integer >= 1 or None"):
        shardfx.Config(prefetch=0)
    with pytest.raises(ValueError, match="hardware='tpu' is not a profile"):
        shardfx.Config(hardware="tpu")
