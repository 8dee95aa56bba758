"""`shardfx export`: a checkpoint becomes one safetensors file that loads strictly into a fresh model."""

from __future__ import annotations

import pytest
import torch

import shardfx
from shardfx.models import GPT, GPTConfig, gpt_loss
from shardfx.tools.cli import main

safetensors_torch = pytest.importorskip("safetensors.torch")


def test_export_loads_strictly_and_gives_the_same_outputs(tmp_path) -> None:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=32, n_layer=1, d_model=16, n_head=2, seq_len=8)  # tied embedding and head
    model = GPT(config)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 32, (4, 8), generator=g), torch.randint(0, 32, (4, 8), generator=g)
    engine = shardfx.compile_distributed(
        model,
        2,
        example_inputs=batch,
        loss_fn=gpt_loss,
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2),
        config=shardfx.Config(zero_stage=3),
    )
    engine.train_step(*batch)
    engine.save_checkpoint(str(tmp_path / "ckpt"))
    out = tmp_path / "model.safetensors"
    assert main(["export", str(tmp_path / "ckpt"), "--to", str(out)]) == 0

    fresh = GPT(config)
    fresh.load_state_dict(safetensors_torch.load_file(str(out)), strict=True)
    trained = GPT(config)
    trained.load_state_dict(engine.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(batch[0]), trained(batch[0]))


def test_export_names_a_bad_checkpoint(tmp_path, capsys) -> None:
    assert main(["export", str(tmp_path / "missing"), "--to", str(tmp_path / "m.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
