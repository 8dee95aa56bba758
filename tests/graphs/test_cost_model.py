"""The cost model: roofline compute, alpha-beta collectives, and what overlap hides."""

from __future__ import annotations

import dataclasses

import pytest

import shardfx
from shardfx.graphs import collectives, cost_model
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
    sim = simulate(compiled(zero_stage=3, bucket_mb=0, overlap=False), hardware("h100"))
    assert sim.exposed_comm_seconds == pytest.approx(sim.comm_seconds)
    assert sim.step_seconds == pytest.approx(sim.compute_seconds + sim.comm_seconds)


@pytest.mark.parametrize("hw", sorted(PROFILES))
def test_overlap_hides_communication(hw: str) -> None:
    plain = simulate(compiled(zero_stage=3, bucket_mb=64.0, overlap=False), hardware(hw))
    overlapped = simulate(compiled(zero_stage=3, bucket_mb=64.0, overlap=True, prefetch=1), hardware(hw))
    assert overlapped.comm_seconds == pytest.approx(plain.comm_seconds)
    assert overlapped.exposed_comm_seconds < plain.exposed_comm_seconds
    assert overlapped.step_seconds < plain.step_seconds


def test_ranks_sharing_cores_hide_less() -> None:
    """Hardware.overlap: the share of an async collective that runs beside compute. At 0 (the
    communication takes the cores compute needs) overlapping gains nothing over waiting."""
    plain = compiled(zero_stage=3, bucket_mb=64.0, overlap=False)
    overlapped = compiled(zero_stage=3, bucket_mb=64.0, overlap=True, prefetch=1)
    steps = [simulate(overlapped, dataclasses.replace(hardware("h100"), overlap=f)).step_seconds for f in (0, 0.5, 1)]
    assert steps[0] > steps[1] > steps[2]
    assert steps[0] >= simulate(plain, hardware("h100")).step_seconds * (1 - 1e-9)


def test_bucketing_saves_latency() -> None:
    plain = compiled(zero_stage=3, bucket_mb=0, overlap=False)
    bucketed = compiled(zero_stage=3, bucket_mb=64.0, overlap=False)
    hw = hardware("h100")
    n_plain = sum(collectives.is_collective(n) for n in plain.graph.nodes)
    n_bucketed = sum(collectives.is_collective(n) for n in bucketed.graph.nodes)
    saved = (n_plain - n_bucketed) * hw.alpha
    assert simulate(plain, hw).comm_seconds - simulate(bucketed, hw).comm_seconds == pytest.approx(saved, rel=1e-6)


def test_unknown_profile() -> None:
    with pytest.raises(ValueError, match="unknown hardware profile 'tpu'; known:"):
        hardware("tpu")


def test_auto_is_this_machines_profile_and_a_calibration_is_for_its_machine_only(tmp_path, monkeypatch) -> None:
    path = tmp_path / "hardware.json"
    monkeypatch.setattr(cost_model, "CALIBRATION_FILE", path)
    assert hardware("auto") == hardware("cpu") == PROFILES["cpu"]  # no GPU, no calibration yet
    mine = dataclasses.replace(PROFILES["cpu"], alpha=1e-3, source="calibrated", machine=cost_model.machine_id())
    cost_model.save_calibration(mine)
    assert hardware("auto") == mine
    cost_model.save_calibration(dataclasses.replace(mine, machine="another CPU x64, torch 2.11"))
    assert hardware("cpu") == PROFILES["cpu"]  # measured elsewhere: not used here
    path.write_text('{"name": "cpu", "alpha": 1}')  # an older file's fields: the built-in profile
    assert hardware("cpu") == PROFILES["cpu"]


def test_trace_of_the_simulated_step() -> None:
    """A Chrome/Perfetto trace: per rank a compute and a communication track; its length is the
    simulated step, and its exposed slices add up to the exposed communication."""
    import json

    program = compiled(zero_stage=3, bucket_mb=64.0, overlap=True, prefetch=1)
    hw = hardware("cpu")
    sim = simulate(program, hw)
    data = json.loads(json.dumps(cost_model.trace(program, hw)))  # what a file holds
    slices = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in slices} == {0, 1, 2, 3}  # world size 4
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in data["traceEvents"] if e["name"] == "thread_name"}
    assert sorted(set(names.values())) == ["communication", "compute"] and len(names) == 8
    rank0 = [e for e in slices if e["pid"] == 0]
    assert max(e["ts"] + e["dur"] for e in rank0) == pytest.approx(sim.step_seconds * 1e6)
    exposed = sum(e["dur"] for e in rank0 if e["cat"] == "exposed")
    assert exposed == pytest.approx(sim.exposed_comm_seconds * 1e6) and exposed > 0
    assert sum(e["dur"] for e in rank0 if e["cat"] == "collective") == pytest.approx(sim.comm_seconds * 1e6)
    assert all(e["tid"] == cost_model.COMM_TRACK for e in rank0 if e["cat"] == "collective")
