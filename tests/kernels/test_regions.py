"""Each lowered region against the unfused ops it replaced, on odd shapes (37 rows x 129 cols).

The modules put one memory-bound op between a linear layer (so its backward
needs dx) and a loss against random targets: the captured graph holds the op
forward and backward as torch emits them.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from shardfx.graphs.format import format_program  # noqa: E402
from shardfx.graphs.program import TRITON_REGIONS  # noqa: E402
from shardfx.kernels.launch import TRITON_REGION  # noqa: E402
from tests.kernels.util import COLS, ROWS, captured, lowered, region_case, run  # noqa: E402


def _kernels(program) -> int:  # type: ignore[no-untyped-def]
    return sum(n.target is TRITON_REGION for n in program.graph.nodes)


@pytest.mark.parametrize("op", ["layer_norm", "gelu_tanh", "gelu", "softmax", "cross_entropy"])
def test_region_matches_unfused_fp32(op: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, batch, loss_fn = region_case(op)
    program = captured(model, batch, loss_fn)
    fused, records = lowered(program, tmp_path)
    expected = run(program, model, batch)
    got = run(fused, model, batch)
    assert _kernels(fused) >= 2  # forward and backward regions
    assert records[-1].stats["kernels_per_step_after"] < records[-1].stats["kernels_per_step_before"]
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert "shardfx.triton_region" in format_program(fused)


def test_cross_entropy_is_one_kernel_each_way(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, batch, loss_fn = region_case("cross_entropy")
    fused, _ = lowered(captured(model, batch, loss_fn), tmp_path)
    rows = [r for r in fused.notes[TRITON_REGIONS] if r.domain == f"{ROWS}x{COLS}"]
    # forward: log-softmax and the target's log-probability; backward: nll backward + log-softmax backward
    assert sorted(r.phase for r in rows) == ["backward", "forward"]


def test_layer_norm_backward_is_one_kernel(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, batch, loss_fn = region_case("layer_norm")
    fused, _ = lowered(captured(model, batch, loss_fn), tmp_path)
    regions = fused.notes[TRITON_REGIONS]
    backward = [r for r in regions if r.phase == "backward" and r.domain == f"{ROWS}x{COLS}"]
    assert any(r.ops >= 10 for r in backward)  # dx of layer norm (two row sums) in one kernel
    for r in regions:
        assert r.kernel_bytes <= r.unfused_bytes


@pytest.mark.parametrize("op", ["layer_norm", "gelu_tanh", "softmax", "cross_entropy"])
def test_region_matches_unfused_bf16(op: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, batch, loss_fn = region_case(op)
    batch = tuple(b.to(torch.bfloat16) if b.is_floating_point() else b for b in batch)
    program = captured(model, batch, loss_fn, torch.bfloat16)
    fused, _ = lowered(program, tmp_path)
    expected = run(program, model, batch, torch.bfloat16)
    got = run(fused, model, batch, torch.bfloat16)
    calls = [n for n in fused.graph.nodes if n.target is TRITON_REGION]
    assert any(v.dtype == torch.bfloat16 for n in calls for v in n.meta["val"])  # bf16 at the kernel's edges
    for e, g in zip(expected, got):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-2)
