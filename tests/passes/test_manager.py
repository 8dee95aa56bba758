"""The pass manager: failures name the pass, the passes before it and the node; dumps after every pass."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

import shardfx
from shardfx.errors import PassError, ShardfxError
from shardfx.graphs.capture import capture
from shardfx.graphs.program import DistProgram, Mesh
from shardfx.models import MLP
from shardfx.passes.data_parallel import data_parallel
from shardfx.passes.manager import Pass, PassContext, PassResult, run_passes


def small_program() -> DistProgram:
    torch.manual_seed(0)
    cap = capture(MLP(4, (5,), 3), (torch.randn(2, 4), torch.randn(2, 3)), F.mse_loss)
    return DistProgram(cap.gm, cap.signature, Mesh.of(dp=2), cap.fake_mode)


def breaks_on_gelu(program: DistProgram, ctx: PassContext) -> PassResult:
    node = next(n for n in program.graph.nodes if n.target is torch.ops.aten.gelu.default)
    raise ShardfxError("no rule for this op", node)


def leaves_a_dangling_node(program: DistProgram, ctx: PassContext) -> PassResult:
    node = next(n for n in program.graph.nodes if n.target is torch.ops.aten.gelu.default)
    with program.graph.inserting_after(node):
        program.graph.call_function(torch.ops.aten.relu.default, (node,))  # no val: verification fails
    return PassResult(program)


def test_failure_names_pass_previous_passes_node_and_source() -> None:
    passes = [
        Pass("data_parallel", partial(data_parallel, axis="dp"), "why"),
        Pass("breaks_on_gelu", breaks_on_gelu, "why"),
    ]
    with pytest.raises(PassError) as info:
        run_passes(small_program(), passes, PassContext(shardfx.Config()))
    text = str(info.value)
    assert "pass 'breaks_on_gelu' failed (passes before it: data_parallel)" in text
    assert "no rule for this op" in text
    assert "aten.gelu" in text  # the node
    assert "mlp.py" in text  # the user's source line


def test_verification_runs_after_every_pass() -> None:
    with pytest.raises(PassError, match="pass 'leaves_a_dangling_node' failed.*has no 'val'"):
        run_passes(
            small_program(),
            [Pass("leaves_a_dangling_node", leaves_a_dangling_node, "why")],
            PassContext(shardfx.Config()),
        )


def test_records_stats_and_dumps_every_pass(tmp_path) -> None:
    lines: list[str] = []
    program, records = run_passes(
        small_program(),
        [Pass("data_parallel", partial(data_parallel, axis="dp"), "why")],
        PassContext(shardfx.Config(), log=lines.append),
        dump_dir=tmp_path,
    )
    assert records[0].name == "data_parallel" and records[0].collectives == {"all_reduce": 5}
    assert records[0].seconds > 0 and records[0].nodes == len(program.graph.nodes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00_capture.txt", "01_data_parallel.txt"]
    assert "shardfx.all_reduce" in (tmp_path / "01_data_parallel.txt").read_text()
    assert "shardfx.all_reduce" not in (tmp_path / "00_capture.txt").read_text()
    assert lines and "data_parallel" in lines[0]


def test_disable_passes_skips_by_name() -> None:
    config = shardfx.Config(disable_passes=("sync_batch_norm",))
    torch.manual_seed(0)
    engine = shardfx.compile_distributed(
        MLP(4, (5,), 3, batchnorm=True),
        2,
        example_inputs=(torch.randn(4, 4), torch.randn(4, 3)),
        loss_fn=F.mse_loss,
        config=config,
    )
    assert [r.name for r in engine.pass_records if r.skipped] == ["sync_batch_norm"]
