"""memory_timeline: allocations at the producing node, frees after the last read of the value or its views."""

from __future__ import annotations

import torch
import torch.fx as fx

from shardfx.graphs.analysis import collective_summary, memory_timeline
from shardfx.graphs.program import DistProgram, Mesh
from shardfx.graphs.signature import INPUT, LOSS, InputSpec, OutputSpec, Signature

aten = torch.ops.aten


def chain_program() -> DistProgram:
    """x(400 B) -> a = relu(x) -> v = view(a) -> b = relu(v) -> c = sum(b) -> return c"""
    g = fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(aten.relu.default, (x,))
    v = g.call_function(aten.view.default, (a, [100]))
    b = g.call_function(aten.relu.default, (v,))
    c = g.call_function(aten.sum.default, (b,))
    g.output((c,))
    for node, shape in [(x, (10, 10)), (a, (10, 10)), (v, (100,)), (b, (100,)), (c, ())]:
        node.meta["val"] = torch.empty(shape)
    return DistProgram(
        fx.GraphModule({}, g), Signature([InputSpec(INPUT, "x")], [OutputSpec(LOSS)]), Mesh.of(dp=1), None
    )


def test_chain_timeline() -> None:
    t = memory_timeline(chain_program())
    # nodes: x, a, v, b, c, output
    assert t.held == 400
    assert t.live == [400, 800, 800, 1200, 804, 404]  # x is held all step; a (and its view v) freed after b
    assert t.peak == 1200 and t.peak_node.name == "relu_default_1"


def test_zero3_lowers_the_peak_and_the_graph_knows_its_traffic() -> None:
    import shardfx
    from shardfx.models import gpt_loss
    from tests.fixtures import UNPLANNED, gpt_batch, tiny_gpt

    peaks = {}
    for stage in (0, 3):
        engine = shardfx.compile_distributed(
            tiny_gpt(),
            4,
            example_inputs=gpt_batch(),
            loss_fn=gpt_loss,
            config=shardfx.Config(zero_stage=stage, **UNPLANNED),
        )
        peaks[stage] = memory_timeline(engine.program).peak
        engine.train_step(*gpt_batch())
        measured = engine.stats()["comm"]
        assert collective_summary(engine.program) == {"calls": measured["calls"], "volume": measured["volume"]}
    assert peaks[3] < peaks[0]


def _started(kind: str) -> DistProgram:
    """x(400 B) -> a = relu(x) -> s = <kind>_start(a) -> b = relu(x) -> w = wait(s) -> c = sum(w) + sum(b)"""
    from shardfx.graphs import collectives

    g = fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(aten.relu.default, (x,))
    extra = (0,) if kind == "all_gather" else ("sum",)
    s = g.call_function(collectives.START_OPS[kind], (a, "dp", *extra))
    b = g.call_function(aten.relu.default, (x,))
    w = g.call_function(torch.ops.shardfx.wait.default, (s,))
    c = g.call_function(
        aten.add.Tensor, (g.call_function(aten.sum.default, (w,)), g.call_function(aten.sum.default, (b,)))
    )
    g.output((c,))
    out = (20, 10) if kind == "all_gather" else (10, 10)
    for node, shape in [(x, (10, 10)), (a, (10, 10)), (s, out), (b, (10, 10)), (w, out)]:
        node.meta["val"] = torch.empty(shape)
    for node in g.nodes:
        node.meta.setdefault("val", torch.empty(()))
    return DistProgram(
        fx.GraphModule({}, g), Signature([InputSpec(INPUT, "x")], [OutputSpec(LOSS)]), Mesh.of(dp=2), None
    )


def test_a_started_reduction_holds_its_input_until_the_wait_and_a_gather_frees_it_at_its_start() -> None:
    """The transfer of an all-reduce reads its input until it completes; a gather's start copies its
    input into its own rows of the output and sends from there (runtime/dist_comm.py)."""
    reduce, gather = memory_timeline(_started("all_reduce")), memory_timeline(_started("all_gather"))
    # nodes: x, a, start, b, wait, ...: at b, the reduction still holds a (400 B) beside its output
    assert reduce.live[3] == 400 + 400 + 400 + 400
    assert gather.live[3] == 400 + 800 + 400  # x, the gathered output, b: a was freed at the start
