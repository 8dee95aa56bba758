"""The planner (Config(plan="auto")): what it picks fits, an impossible limit is a clear error,
explicit settings are kept or refused, and compile_distributed logs and exposes the plan."""

from __future__ import annotations

import pytest
import torch

import shardfx
from shardfx.models import gpt_loss
from shardfx.planner import SEARCHED, plan_step
from tests.fixtures import gpt_batch, tiny_gpt

DP_ONLY = ("tp_size", "pp_size")  # data parallelism only: the cheapest search, for most tests


def plan(config: shardfx.Config, world_size: int = 2, keep=DP_ONLY):  # noqa: ANN001, ANN201
    return plan_step(tiny_gpt(), gpt_batch(8), gpt_loss, config, world_size, keep=keep)


@pytest.fixture(scope="module")
def unlimited():  # noqa: ANN201
    return plan(shardfx.Config(plan="auto"))


def test_without_a_limit_the_fastest_candidate_wins(unlimited) -> None:  # noqa: ANN001
    assert unlimited.chosen is unlimited.candidates[0]
    assert unlimited.chosen.step_seconds == min(c.step_seconds for c in unlimited.candidates)
    assert unlimited.config.plan is None and unlimited.config.memory_limit is None
    assert {c.config.zero_stage for c in unlimited.candidates} == {0, 1, 2, 3}
    assert all(c.config.tp_size == 1 and c.config.pp_size == 1 for c in unlimited.candidates)
    assert unlimited.compiled.program is not None


def test_the_plan_fits_the_limit_by_the_simulated_peak(unlimited) -> None:  # noqa: ANN001
    peaks = sorted({c.peak_bytes for c in unlimited.candidates})
    limit = (peaks[0] + peaks[-1]) / 2  # some candidates fit, the largest do not
    limited = plan(shardfx.Config(plan="auto", memory_limit=limit))
    assert limited.chosen.peak_bytes <= limit and limited.chosen.fits
    assert all(c.fits == (c.peak_bytes <= limit) for c in limited.candidates)
    fitting = [c for c in limited.candidates if c.fits]
    assert limited.chosen.step_seconds == min(c.step_seconds for c in fitting)
    assert any(not c.fits for c in limited.candidates)
    assert "->" in limited.table() and limited.chosen.label in limited.table()


def test_an_impossible_limit_names_the_smallest_peak_found() -> None:
    with pytest.raises(
        ValueError, match=r"no configuration fits; the smallest simulated peak found is [0-9.]+ MiB"
    ) as e:
        plan(shardfx.Config(plan="auto", memory_limit=1000))
    assert "raise memory_limit to at least" in str(e.value) and "recompute full" in str(e.value)


def test_explicit_settings_are_kept() -> None:
    kept = plan(shardfx.Config(plan="auto", zero_stage=3, reshard_after_forward=False, recompute="selective"))
    assert {(c.config.zero_stage, c.config.reshard_after_forward, c.config.recompute) for c in kept.candidates} == {
        (3, False, "selective")
    }
    comm = plan(shardfx.Config(plan="auto", zero_stage=2, bucket_mb=0.0, overlap=False))
    assert comm.config.bucket_mb == 0.0 and comm.config.overlap is False
    assert comm.chosen.comm == "bucket 0 MiB, no overlap"


def test_bad_plan_settings_are_refused() -> None:
    with pytest.raises(ValueError, match=r"Config.plan='manual' is not allowed; choose one of \[None, 'auto'\]"):
        shardfx.Config(plan="manual")
    with pytest.raises(ValueError, match=r"memory_limit=.*needs plan='auto'"):
        shardfx.Config(memory_limit=1e9)
    with pytest.raises(ValueError, match=r"Config.memory_limit must be bytes > 0"):
        shardfx.Config(plan="auto", memory_limit=-1)
    with pytest.raises(ValueError, match=r"not fields the planner searches; it searches"):
        plan(shardfx.Config(plan="auto"), keep=("bucket_mb",))
    with pytest.raises(ValueError, match=r"plans a Config\(plan='auto'\)"):
        plan(shardfx.Config())
    assert set(SEARCHED) == {"tp_size", "pp_size", "zero_stage", "reshard_after_forward", "recompute"}


def test_compile_distributed_logs_and_exposes_the_plan() -> None:
    lines: list[str] = []
    model, batch = tiny_gpt(), gpt_batch(8)
    engine = shardfx.compile_distributed(
        model,
        2,
        example_inputs=batch,
        loss_fn=gpt_loss,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        config=shardfx.Config(plan="auto", memory_limit=2**20),
        log=lines.append,
    )
    assert engine.plan is not None and engine.config == engine.plan.config
    assert [line for line in lines if line.startswith("plan: ")] == [engine.plan.describe()]
    stats = engine.stats()["plan"]
    assert stats["chosen"]["fits"] and stats["chosen"]["peak_bytes"] <= 2**20
    assert stats["chosen"]["config"] == engine.plan.chosen.label
    assert torch.isfinite(engine.train_step(*batch))
