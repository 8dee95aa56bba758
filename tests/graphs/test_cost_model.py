"""The cost model: roofline compute, alpha-beta collectives, and what overlap hides."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

import shardfx
from shardfx.graphs import collectives, cost_model, ops
from shardfx.graphs.analysis import tensor_bytes
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
    builtin = PROFILES["cpu"]
    assert hardware("auto") == hardware("cpu") == builtin  # no GPU, no calibration yet
    here = os.cpu_count()
    mine = dataclasses.replace(builtin, alpha=1e-3, source="calibrated", machine=cost_model.machine_id(), cores=here)
    cost_model.save_calibration(mine)
    assert hardware("auto") == mine
    four = dataclasses.replace(mine, ranks=4, alpha=5e-3)
    cost_model.save_calibration(four)  # another rank count: kept beside the first
    assert hardware("cpu") == mine and hardware("cpu", ranks=4) == four
    assert mine.at(4) == four  # simulating 4 ranks takes what was measured at 4, not the scaled 2
    # a count not measured: scaled from the nearest one measured, whichever calibration it starts from
    assert hardware("cpu", ranks=5) == mine.at(5) == four.at(5) == four.at(5, cores=here)
    assert mine.at(5).source.startswith("calibrated; scaled from 4 ranks")
    changed = dataclasses.replace(mine, overlap=1.0)  # not a saved calibration: scaled as it is
    assert changed.at(4).overlap == 1.0 and changed.at(4).alpha != four.alpha
    cost_model.save_calibration(dataclasses.replace(mine, machine="another CPU x64, torch 2.11"))
    assert hardware("cpu") == builtin  # measured elsewhere: not used here
    path.write_text('{"name": "cpu", "alpha": 1}')  # damaged: the built-in profile
    assert hardware("cpu") == builtin
    entry = {**dataclasses.asdict(mine), "gather_as_all_reduce": True}  # written by another version
    path.write_text(json.dumps({"machine": mine.machine, "profiles": [entry]}))
    with pytest.warns(UserWarning, match=r"another version of shardfx \(fields \['gather_as_all_reduce'\]\)"):
        assert hardware("cpu") == builtin
    older = {k: v for k, v in dataclasses.asdict(mine).items() if k != "exchange_alpha"}  # before it was measured
    path.write_text(json.dumps({"machine": mine.machine, "profiles": [dataclasses.asdict(four), older]}))
    with pytest.warns(
        UserWarning, match=r"another version of shardfx \(no \['exchange_alpha'\]\).*measures the machine again"
    ):
        assert hardware("cpu") == builtin and cost_model.calibrated_ranks() == set()


def test_ranks_sharing_cores_share_their_compute() -> None:
    """A CPU profile measured with 2 ranks on 2 cores, at 4 ranks: each rank has half a core, so its
    FLOP/s and bytes/s halve and every fixed cost doubles; a device per rank (a GPU profile) is unchanged."""
    cpu = PROFILES["cpu"]
    assert (cpu.ranks, cpu.cores) == (2, 2)
    assert cpu.at(2, cores=2) is cpu and PROFILES["h100"].at(8) is PROFILES["h100"]
    four = cpu.at(4, cores=2)
    assert four.fp32_flops == cpu.fp32_flops / 2 and four.mem_bw == cpu.mem_bw / 2
    assert four.op_overhead == 2 * cpu.op_overhead and four.view_overhead == 2 * cpu.view_overhead
    assert four.optimizer_element == 2 * cpu.optimizer_element and four.link_bw == cpu.link_bw / 2
    assert four.alpha == 2 * cpu.alpha * 3  # stretched by 2, and a ring of 4 has 3 steps to 2's one
    one = cpu.at(1, cores=2)  # one rank has both cores (two threads): twice the rate, the same fixed costs
    assert one.fp32_flops == 2 * cpu.fp32_flops and one.op_overhead == cpu.op_overhead
    # on a 16-core machine, 16 ranks have a core each, as the 2 ranks it was measured with had
    sixteen = cpu.at(16, cores=16)
    assert sixteen.fp32_flops == cpu.fp32_flops and sixteen.op_overhead == cpu.op_overhead
    assert sixteen.alpha == cpu.alpha * 15  # only the ring's steps
    # the simulation of a 4-rank program uses the 4-rank figures on this machine's cores
    program = compiled(zero_stage=0, bucket_mb=0, overlap=False)
    assert simulate(program, cpu).compute_seconds == pytest.approx(simulate(program, cpu.at(4)).compute_seconds)


def test_a_reduce_scatter_sends_its_share_of_the_input_and_an_all_reduce_twice_that() -> None:
    """A ring reduce-scatter (NCCL's; gloo's as shardfx runs it, one exchange with each peer) sends
    (N-1)/N of its input per rank."""
    program = compiled(zero_stage=2, bucket_mb=0, overlap=False)
    scatter = next(
        n for n in program.graph.nodes if collectives.is_collective(n) and collectives.kind(n) == "reduce_scatter"
    )
    full = tensor_bytes(scatter.args[0].meta["val"])
    n = program.mesh.world_size
    for name in ("h100", "cpu"):
        hw = dataclasses.replace(PROFILES[name], alpha=0.0, exchange_alpha=0.0)
        assert cost_model.collective_seconds(scatter, program, hw) == pytest.approx(full * (n - 1) / n / hw.link_bw)


def test_gathers_and_scatters_run_as_exchanges_take_their_own_latency() -> None:
    """On gloo shardfx runs an all-gather or reduce-scatter as one exchange with each peer (one round;
    the ring all-reduce takes 2(N-1) steps): a profile's exchange_alpha prices them, alpha the
    all-reduces; a profile without one (the GPU ones) prices every kind at alpha."""
    program = compiled(zero_stage=3, bucket_mb=0, overlap=False)
    by_kind = {collectives.kind(n): n for n in program.graph.nodes if collectives.is_collective(n)}
    assert set(by_kind) == {"all_gather", "reduce_scatter", "all_reduce"}
    cpu = PROFILES["cpu"]
    assert 0 < cpu.exchange_alpha < cpu.alpha
    fast = dataclasses.replace(cpu, link_bw=float("inf"))
    for kind, node in by_kind.items():
        latency = cpu.alpha if kind == "all_reduce" else cpu.exchange_alpha
        assert cost_model.collective_seconds(node, program, fast) == pytest.approx(latency)
        gpu = dataclasses.replace(PROFILES["h100"], link_bw=float("inf"))
        assert cost_model.collective_seconds(node, program, gpu) == pytest.approx(gpu.alpha)
    # stretched by 2, and it sends to 3 peers where 2 ranks send to one
    assert cpu.at(4, cores=2).exchange_alpha == 2 * cpu.exchange_alpha * 3


def test_the_optimizer_updates_the_elements_a_rank_holds() -> None:
    """Adam(W) after the program: per element this rank updates (a quarter of them under ZeRO-3 at
    world size 4, plus padding) and per parameter tensor."""
    hw = dataclasses.replace(PROFILES["h100"], optimizer_element=1e-9, optimizer_tensor=1e-6)
    full, sharded = compiled(zero_stage=0), compiled(zero_stage=3)
    model = tiny_gpt()
    elements = sum(p.numel() for p in model.parameters())
    tensors = len(list(model.parameters()))
    assert simulate(full, hw).optimizer_seconds == pytest.approx(elements * 1e-9 + tensors * 1e-6)
    quarter = simulate(sharded, hw).optimizer_seconds - tensors * 1e-6
    assert elements / 4 * 1e-9 <= quarter <= (elements / 4 + 4 * tensors) * 1e-9  # shards padded to 4
    # no measured rate: Adam's 28 bytes an element over the memory bandwidth
    h100 = PROFILES["h100"]
    assert simulate(full, h100).optimizer_seconds == pytest.approx(elements * 28 / h100.mem_bw)


def test_views_cost_their_dispatch_and_gelu_its_arithmetic() -> None:
    program = compiled(zero_stage=0)
    hw = dataclasses.replace(PROFILES["cpu"], view_overhead=3e-6, special_rate=1e6, tanh_gelu_rate=2e5)
    view = next(n for n in program.graph.nodes if n.target is torch.ops.aten.view.default)
    assert cost_model.compute_seconds(view, hw) == 3e-6
    # the GPT's GELU is the tanh approximation (GPT-2's), forward and backward, at a rate of its own
    for op in (torch.ops.aten.gelu.default, torch.ops.aten.gelu_backward.default):
        node = next(n for n in program.graph.nodes if n.target is op)
        assert node.kwargs.get("approximate") == "tanh"
        numel = node.meta["val"].numel()
        assert cost_model.compute_seconds(node, hw) == pytest.approx(numel / 2e5 + hw.op_overhead)
        no_rate = dataclasses.replace(hw, tanh_gelu_rate=0.0)  # a profile without it: the erf GELU's rate
        assert cost_model.compute_seconds(node, no_rate) == pytest.approx(numel / 1e6 + hw.op_overhead)
    erf = torch.fx.Graph()
    x = erf.placeholder("x")
    x.meta["val"] = torch.empty(8, 16)
    node = erf.call_function(torch.ops.aten.gelu.default, (x,))
    node.meta["val"] = torch.empty(8, 16)
    assert cost_model.compute_seconds(node, hw) == pytest.approx(128 / 1e6 + hw.op_overhead)


def test_attention_runs_at_a_rate_of_its_own() -> None:
    program = compiled(zero_stage=0)
    hw = dataclasses.replace(PROFILES["cpu"], mem_bw=1e18, fp32_flops=4e9, attention_flops=1e9)
    kernels = [n for n in program.graph.nodes if n.op == "call_function" and ops.attention(n.target)]
    assert len(kernels) == 2 * 2  # the tiny GPT's 2 layers, forward and backward
    for node in kernels:
        assert node_flops(node) > 0
        assert cost_model.compute_seconds(node, hw) == pytest.approx(node_flops(node) / 1e9 + hw.op_overhead)
        no_rate = dataclasses.replace(hw, attention_flops=0.0)  # a profile without it: the matmuls' rate
        assert cost_model.compute_seconds(node, no_rate) == pytest.approx(node_flops(node) / 4e9 + hw.op_overhead)
    assert hw.attention_rate(torch.bfloat16) == 1e9 * hw.bf16_flops / 4e9  # other dtypes: as their matmuls
    # a bf16 kernel (its outputs are a tuple: the query says the dtype) at the scaled rate
    bf16 = compiled(zero_stage=0, mixed_precision="bf16")
    node = next(n for n in bf16.graph.nodes if n.op == "call_function" and ops.attention(n.target))
    assert node.args[0].meta["val"].dtype == torch.bfloat16
    rate = hw.attention_rate(torch.bfloat16)
    assert cost_model.compute_seconds(node, hw) == pytest.approx(node_flops(node) / rate + hw.op_overhead)


def test_ranks_that_share_cores_wait_for_the_one_the_os_serves_least() -> None:
    """Hardware.skew: the slowest rank's compute is (1 + skew) x the mean rank's, and the step runs at
    its pace. In a synchronous step all of it shows; in an overlapped one the slower compute hides more
    of the communication, so the step grows by less."""
    hw = dataclasses.replace(PROFILES["cpu"].at(4, cores=os.cpu_count()), skew=0.0)  # as simulate scales it
    plain = compiled(zero_stage=3, bucket_mb=0, overlap=False)
    before = simulate(plain, hw)
    late = simulate(plain, dataclasses.replace(hw, skew=0.25))
    assert late.compute_seconds == pytest.approx(1.25 * before.compute_seconds)
    assert late.comm_seconds == pytest.approx(before.comm_seconds)
    assert late.step_seconds - before.step_seconds == pytest.approx(0.25 * before.compute_seconds)
    assert late.optimizer_seconds == pytest.approx(1.25 * before.optimizer_seconds)
    overlapped = compiled(zero_stage=3, bucket_mb=64.0, overlap=True, prefetch=2)
    base = simulate(overlapped, hw)
    grown = simulate(overlapped, dataclasses.replace(hw, skew=0.25)).step_seconds - base.step_seconds
    assert 0 < grown < 0.25 * base.compute_seconds
    # the skew grows with the share of the time a rank waits for a core: 1 - cores / ranks
    four = dataclasses.replace(PROFILES["cpu"], ranks=4, cores=2, skew=0.2)
    assert four.at(8, cores=2).skew == pytest.approx(0.2 * 0.75 / 0.5)
    assert four.at(2, cores=2).skew == 0.0 and four.at(16, cores=16).skew == 0.0
    two = dataclasses.replace(PROFILES["cpu"], skew=0.01)  # measured with a core per rank: it stands
    assert two.at(4, cores=2).skew == 0.01


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


def test_the_runtimes_own_copies_and_sums_take_compute_time() -> None:
    """DistComm reduces a copy of an all-reduce's input unless it runs in place (all_reduce_start_);
    on gloo it sums a reduce-scatter's received parts once they arrive: both on the rank's thread."""
    program = compiled(zero_stage=0, bucket_mb=0, overlap=False)
    reduce = next(n for n in program.graph.nodes if collectives.is_collective(n))
    nbytes = tensor_bytes(reduce.args[0].meta["val"])
    cpu = PROFILES["cpu"]
    assert reduce.args[2] == "avg"  # divided in place once reduced: 2 passes more
    assert cost_model.host_seconds(reduce, program, cpu) == (2 * nbytes / cpu.mem_bw, 2 * nbytes / cpu.mem_bw)
    in_place = compiled(zero_stage=0, bucket_mb=0, overlap=True, prefetch=1)
    start = next(n for n in in_place.graph.nodes if n.target is collectives.ALL_REDUCE_START_)
    start_bytes = tensor_bytes(start.args[0].meta["val"])
    assert cost_model.host_seconds(start, in_place, cpu) == (0.0, 2 * start_bytes / cpu.mem_bw)
    scattered = compiled(zero_stage=2, bucket_mb=0, overlap=False)
    scatter = next(
        n for n in scattered.graph.nodes if collectives.is_collective(n) and collectives.kind(n) == "reduce_scatter"
    )
    out = tensor_bytes(scatter.meta["val"])
    parts = scattered.mesh.world_size
    # a copy and N - 1 adds (3N - 1 passes), then the average's division (2)
    assert cost_model.host_seconds(scatter, scattered, cpu) == (0.0, (3 * parts - 1 + 2) * out / cpu.mem_bw)
    h100 = PROFILES["h100"]  # NCCL sums in its kernel; the average is still divided after
    assert cost_model.host_seconds(scatter, scattered, h100) == (0.0, 2 * out / h100.mem_bw)
    # the simulation spends them on compute
    with_copies = simulate(program, cpu).compute_seconds
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cost_model, "host_seconds", lambda *args: (0.0, 0.0))
        without = simulate(program, cpu).compute_seconds
    scaled = cpu.at(program.mesh.world_size)
    copies = sum(
        sum(cost_model.host_seconds(n, program, scaled)) for n in program.graph.nodes if collectives.is_collective(n)
    )
    assert with_copies - without == pytest.approx(copies)
