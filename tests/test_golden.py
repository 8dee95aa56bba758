"""Golden printed programs for tiny models after the full pipeline.

When a change alters them on purpose, rewrite with
    SHARDFX_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py
and review the diff of tests/golden/ like code.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import shardfx
from shardfx.graphs.capture import TORCH_VERSION
from shardfx.graphs.format import format_program
from shardfx.models import GPT, MLP, GPTConfig, gpt_loss

GOLDEN = Path(__file__).parent / "golden"
# Bucketing and overlap as planned by the cost model, on a data-sheet profile: "h100" is the same
# on every machine (the "cpu" one is whatever `shardfx calibrate` measured there).
PLANNED = {"hardware": "h100"}
CASES = {
    "mlp_dp2": shardfx.Config(zero_stage=0, **PLANNED),
    "mlp_zero3_dp2": shardfx.Config(zero_stage=3, **PLANNED),
}
# A one-block GPT: attention, MLP, layer norms, the tied embedding and head.
GPT_CASES = {
    "gpt_zero3_dp2": shardfx.Config(zero_stage=3, **PLANNED),
    "gpt_tp2": shardfx.Config(tp_size=2, **PLANNED),
    "gpt_bf16_dp2": shardfx.Config(mixed_precision="bf16", **PLANNED),
}


@pytest.mark.skipif(TORCH_VERSION != (2, 13), reason="node names follow the torch version the goldens were made with")
@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_program(name: str) -> None:
    torch.manual_seed(0)
    model = MLP(4, (5,), 3)  # 5 rows do not divide over 2 ranks: padding shows
    batch = (torch.randn(4, 4), torch.randn(4, 3))
    engine = shardfx.compile_distributed(model, 2, example_inputs=batch, loss_fn=F.mse_loss, config=CASES[name])
    check_golden(name, format_program(engine.program, f"{name}: MLP(4, (5,), 3), world_size 2"))


@pytest.mark.skipif(TORCH_VERSION != (2, 13), reason="node names follow the torch version the goldens were made with")
@pytest.mark.parametrize("name", sorted(GPT_CASES))
def test_golden_gpt_program(name: str) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=1, d_model=32, n_head=2, seq_len=16, bias=False))
    g = torch.Generator().manual_seed(2)
    batch = (torch.randint(0, 64, (4, 16), generator=g), torch.randint(0, 64, (4, 16), generator=g))
    engine = shardfx.compile_distributed(model, 2, example_inputs=batch, loss_fn=gpt_loss, config=GPT_CASES[name])
    check_golden(name, format_program(engine.program, f"{name}: GPT 1 block, d 32, 2 heads, world_size 2"))


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("SHARDFX_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"no golden file {path}; run with SHARDFX_UPDATE_GOLDEN=1"
    assert text == path.read_text()
