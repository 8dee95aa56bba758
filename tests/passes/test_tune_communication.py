"""tune_communication: the cost model picks bucket size and prefetch depth; exact; the memory cap holds."""

from __future__ import annotations

import pytest
import torch

import shardfx
from shardfx.graphs.analysis import memory_timeline
from shardfx.graphs.cost_model import hardware, simulate
from shardfx.models import gpt_loss
from tests.fixtures import gpt_batch, tiny_gpt
from tests.parity_util import shardfx_train


def tuned(**config):
    losses, state, engine = shardfx_train(
        tiny_gpt(), gpt_batch(), gpt_loss, 2, 4, shardfx.Config(zero_stage=3, tune_communication=True, **config)
    )
    return losses, state, engine, next(r.stats for r in engine.pass_records if r.name == "tune_communication")


def test_picks_the_fastest_simulated_schedule_and_stays_exact() -> None:
    base_losses, base_state, _ = shardfx_train(tiny_gpt(), gpt_batch(), gpt_loss, 2, 4, shardfx.Config(zero_stage=3))
    losses, state, engine, stats = tuned(hardware="h100")
    assert torch.equal(losses, base_losses)
    assert all(torch.equal(state[k], v) for k, v in base_state.items())
    fastest = min(row["step_ms"] for row in stats["table"])
    chosen = next(
        r for r in stats["table"] if r["bucket_mb"] == stats["bucket_mb"] and r["prefetch"] == stats["prefetch"]
    )
    assert chosen["step_ms"] == fastest
    assert simulate(engine.program, hardware("h100")).step_seconds * 1e3 == pytest.approx(fastest, abs=1e-3)


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
