"""A tiny GPT under ZeRO-3 on 2 local ranks: fuse + lower_to_triton (interpreter) against the unfused program."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton")

from shardfx.config import Config  # noqa: E402
from shardfx.driver import build_mesh, compile_step  # noqa: E402
from shardfx.graphs.format import format_program  # noqa: E402
from shardfx.graphs.program import TRITON_REGIONS  # noqa: E402
from shardfx.kernels.launch import TRITON_REGION  # noqa: E402
from shardfx.kernels.report import format_report  # noqa: E402
from shardfx.models import GPT, GPTConfig, gpt_loss  # noqa: E402
from shardfx.runtime.local import LocalRuntime  # noqa: E402
from tests.kernels.util import kernel_passes  # noqa: E402
from tests.parity_util import adamw  # noqa: E402

WORLD = 2


def _train(model, batch, config, extra, steps=2):  # type: ignore[no-untyped-def]
    compiled = compile_step(model, batch, gpt_loss, config, build_mesh(config, WORLD), extra_passes=extra)
    program, records = compiled.program, compiled.records[compiled.last]
    runtime = LocalRuntime(program, copy.deepcopy(model), adamw)
    shards = [tuple(x.chunk(WORLD)[r] for x in batch) for r in range(WORLD)]
    losses = torch.stack([runtime.step(shards) for _ in range(steps)])
    state = runtime.state_dict()
    runtime.close()
    return losses, state, program, records


def test_gpt_zero3_fused_matches_unfused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=37, n_layer=1, d_model=24, n_head=2, seq_len=8, bias=True))
    g = torch.Generator().manual_seed(1)
    batch = (torch.randint(0, 37, (4, 8), generator=g), torch.randint(0, 37, (4, 8), generator=g))
    config = Config(zero_stage=3)
    ref_losses, ref_state, _, _ = _train(model, batch, config, [])
    losses, state, program, records = _train(model, batch, config, kernel_passes(tmp_path))
    assert sum(n.target is TRITON_REGION for n in program.graph.nodes) >= 8
    stats = records[-1].stats
    assert stats["kernels_per_step_after"] < stats["kernels_per_step_before"]
    assert stats["kernel_bytes"] < stats["unfused_bytes"]
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-5)
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=1e-5, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    text = format_program(program)
    assert "shardfx.triton_region" in text and "shardfx.all_gather" in text
    report = format_report(
        program.notes[TRITON_REGIONS], stats["kernels_per_step_before"], stats["kernels_per_step_after"]
    )
    assert "kernels per step" in report
