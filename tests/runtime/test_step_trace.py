"""engine.trace_step: the measured step as a Chrome / Perfetto trace (runtime/step_trace.py).

Structure only, never timing: every rank has its tracks, every compute node and every collective
of the program is there, the summary is the span of the events, and a traced step changes the
state exactly as an untraced one.
"""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch
import torch.distributed as dist

import shardfx
from shardfx.errors import ExecutionError
from shardfx.graphs import collectives, cost_model
from shardfx.models import GPT, GPTConfig, gpt_loss
from shardfx.runtime.launch import launch
from shardfx.runtime.step_trace import COMM_TRACK, COMPUTE_TRACK, OPTIMIZER_TRACK

OVERLAPPED = {"zero_stage": 3, "bucket_mb": 1.0, "overlap": True}


def tiny_gpt_batch(rows: int = 8, n_layer: int = 2):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=n_layer, d_model=32, n_head=2, seq_len=16, bias=False))
    g = torch.Generator().manual_seed(2)
    return model, (torch.randint(0, 64, (rows, 16), generator=g), torch.randint(0, 64, (rows, 16), generator=g))


def engine_for(model, batch, world_size, **config):
    return shardfx.compile_distributed(
        copy.deepcopy(model),
        world_size,
        example_inputs=batch,
        loss_fn=gpt_loss,
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        config=shardfx.Config(**config),
    )


def slices(trace, pid, tid=None, cat=None):
    return [
        e
        for e in trace["traceEvents"]
        if e["ph"] == "X" and e["pid"] == pid and (tid is None or e["tid"] == tid) and (cat is None or e["cat"] == cat)
    ]


def compute_nodes(program):
    return [
        n
        for n in program.graph.nodes
        if n.op == "call_function" and not collectives.is_collective(n) and not collectives.is_wait(n)
    ]


def check_structure(trace, programs, world_size, hardware=True):
    """What every measured trace holds, whatever the timing: for each micro-batch's program, on every rank."""
    json.loads(json.dumps(trace))  # plain JSON
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    expected = {r: f"rank {r} (measured)" for r in range(world_size)}
    if hardware:
        expected.update({world_size + r: f"rank {r} (simulated)" for r in range(world_size)})
    assert names == expected
    waits = 0
    for rank in range(world_size):
        tracks = {e["tid"] for e in slices(trace, rank)}
        assert {COMPUTE_TRACK, COMM_TRACK} <= tracks
        for micro_batch, program in enumerate(programs):
            mine = [e for e in slices(trace, rank) if e["args"].get("micro_batch") == micro_batch]
            compute = [e for e in mine if e["cat"] == "compute"]
            assert [e["args"]["node"] for e in compute] == [n.name for n in compute_nodes(program)]
            comm = Counter(e["args"]["node"] for e in mine if e["tid"] == COMM_TRACK)
            assert comm == Counter(n.name for n in program.graph.nodes if collectives.is_collective(n))
            waits += sum(e["name"] == "wait" and e["cat"] == "exposed" for e in mine)
        span = max(e["ts"] + e["dur"] for e in slices(trace, rank) if e["tid"] != OPTIMIZER_TRACK) / 1e3
        assert trace["otherData"]["rank_step_ms"][rank] == pytest.approx(span, abs=1e-6)
        assert min(e["ts"] for e in slices(trace, rank)) >= 0  # after the barrier
    assert trace["otherData"]["step_ms"] == max(trace["otherData"]["rank_step_ms"])
    assert trace["otherData"]["micro_batches"] == len(programs)
    return waits


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def engine():
    """A ZeRO-3 engine with bucketing and overlap, for the tests whose state does not matter."""
    model, batch = tiny_gpt_batch()
    return engine_for(model, batch, 2, **OVERLAPPED), batch


def test_a_traced_step_holds_every_node_and_changes_the_state_as_an_untraced_one():
    model, batch = tiny_gpt_batch()
    traced, plain = engine_for(model, batch, 2, **OVERLAPPED), engine_for(model, batch, 2, **OVERLAPPED)
    for e in (traced, plain):
        e.train_step(*batch)  # warm-up, as a user would trace
    trace = traced.trace_step(*batch, hardware="h100")
    loss = plain.train_step(*batch)
    assert trace["otherData"]["loss"] == loss.item()
    assert traced.stats()["grad_norm"] == plain.stats()["grad_norm"]  # the same gradients
    assert traced.steps == plain.steps == trace["otherData"]["step"] == 2
    assert_same_state(traced, plain)
    assert torch.equal(traced.train_step(*batch), plain.train_step(*batch))  # the optimizer's state too
    assert_same_state(traced, plain)

    program = traced.programs()["step"]
    assert check_structure(trace, [program], 2) > 0  # ZeRO-3 with overlap: waits
    other = trace["otherData"]
    simulated = cost_model.trace(program, cost_model.hardware("h100"))["otherData"]
    assert other["hardware"] == "h100" and other["simulated_step_ms"] == pytest.approx(simulated["step_ms"])
    for rank in range(2):
        assert [e["name"] for e in slices(trace, rank, OPTIMIZER_TRACK)] == ["optimizer.step"]
        assert len(slices(trace, 2 + rank)) == len(slices(trace, 2)) > 0  # the simulated step, on every rank
        issued = [e for e in slices(trace, rank, COMM_TRACK) if "wait" in e["args"]]
        assert issued and all(e["args"]["end"].startswith("when its wait returned") for e in issued)
    exposed = [sum(e["dur"] for e in slices(trace, r, COMPUTE_TRACK, "exposed")) / 1e3 for r in range(2)]
    assert other["rank_exposed_comm_ms"] == pytest.approx(exposed)


def test_accumulated_micro_batches_follow_each_other():
    model, batch = tiny_gpt_batch(16, n_layer=1)  # one block: the compiles of three programs stay short
    config = {"zero_stage": 2, "grad_accum_steps": 2}
    micro = tuple(x[:8] for x in batch)
    traced, plain = engine_for(model, micro, 2, **config), engine_for(model, micro, 2, **config)
    trace = traced.trace_step(*batch, hardware=None)
    assert trace["otherData"]["loss"] == plain.train_step(*batch).item()
    assert_same_state(traced, plain)
    programs = [traced.programs()[v] for v in traced.schedule.micro_batches]
    check_structure(trace, programs, 2, hardware=False)
    for rank in range(2):
        first, second = (
            [e for e in slices(trace, rank, COMPUTE_TRACK) if e["args"]["micro_batch"] == i] for i in (0, 1)
        )
        assert max(e["ts"] + e["dur"] for e in first) <= min(e["ts"] for e in second)
    assert "hardware" not in trace["otherData"]


def test_a_failing_node_is_named_in_the_traced_step(engine):
    engine, batch = engine
    bad = batch[0].clone()
    bad[0, 0] = 99  # past the vocabulary: the embedding raises
    with pytest.raises(ExecutionError, match=r"^the compiled program failed at node \w+ \(aten\.embedding\.default\)"):
        engine.trace_step(bad, batch[1])
    engine.train_step(*batch)  # not left tracing: the next step runs as usual


def test_bad_calls_are_refused(engine):
    engine, batch = engine
    with pytest.raises(ValueError, match="unknown hardware profile 'tpu'"):
        engine.trace_step(*batch, hardware="tpu")
    engine.backward(engine(*batch))
    with pytest.raises(RuntimeError, match="trace_step runs a whole optimizer step.*state: backward"):
        engine.trace_step(*batch)
    engine.step()


def test_a_pipeline_is_refused() -> None:
    model, batch = tiny_gpt_batch()
    engine = engine_for(model, batch, 2, pp_size=2, pp_microbatches=2)
    with pytest.raises(ValueError, match=r"a pipeline \(pp_size=2\).*not supported"):
        engine.trace_step(*batch)


def _trace_on_gloo() -> dict:
    """Rank r of 2: one engine traces its second step, the other does not; the same start and batches."""
    model, batch = tiny_gpt_batch(n_layer=1)
    traced, plain = engine_for(model, batch, None, **OVERLAPPED), engine_for(model, batch, None, **OVERLAPPED)
    traced.train_step(*batch)
    plain.train_step(*batch)
    trace = traced.trace_step(*batch)
    loss = plain.train_step(*batch).item()
    traced_state, plain_state = traced.state_dict(), plain.state_dict()
    same = all(torch.equal(traced_state[k], plain_state[k]) for k in plain_state)
    nodes = {
        "compute": [n.name for n in compute_nodes(traced.programs()["step"])],
        "collectives": [n.name for n in traced.programs()["step"].graph.nodes if collectives.is_collective(n)],
    }
    return {"rank": dist.get_rank(), "trace": trace, "loss": loss, "same_state": same, "nodes": nodes}


@pytest.mark.multiproc
def test_every_rank_of_a_distributed_job_gets_every_rank_s_events() -> None:
    results = launch(_trace_on_gloo, (), 2, timeout=60)
    first = results[0]["trace"]
    assert results[1]["trace"]["traceEvents"] == first["traceEvents"]  # gathered to every rank
    assert "barrier" in first["otherData"]["clock"]
    for result in results.values():
        assert result["same_state"] and result["trace"]["otherData"]["loss"] == result["loss"]
    nodes = results[0]["nodes"]
    waits = 0
    for rank in range(2):
        compute = [e["args"]["node"] for e in slices(first, rank, COMPUTE_TRACK, "compute")]
        assert compute == nodes["compute"]
        assert Counter(e["args"]["node"] for e in slices(first, rank, COMM_TRACK)) == Counter(nodes["collectives"])
        waits += sum(e["name"] == "wait" for e in slices(first, rank, COMPUTE_TRACK, "exposed"))
    assert waits > 0
