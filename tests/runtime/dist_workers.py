"""Worker functions for multi-process tests (importable, as spawned processes need)."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

import shardfx
from shardfx.models import GPT, GPTConfig, gpt_loss


def tiny_gpt_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=2, d_model=32, n_head=2, seq_len=16, bias=False))
    g = torch.Generator().manual_seed(2)
    batch = torch.randint(0, 64, (8, 16), generator=g), torch.randint(0, 64, (8, 16), generator=g)
    return model, batch


def train_gpt(zero_stage: int, steps: int, **config: object) -> dict:
    model, batch = tiny_gpt_batch()
    engine = shardfx.compile_distributed(
        model,
        None,
        example_inputs=batch,
        loss_fn=gpt_loss,
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        config=shardfx.Config(zero_stage=zero_stage, **config),
    )
    losses = [engine.train_step(*batch).item() for _ in range(steps)]
    state = engine.state_dict()
    return {"losses": losses, "state": state, "stats": engine.stats(), "rank": dist.get_rank()}


def die_on_rank(rank_to_die: int) -> None:
    """Rank `rank_to_die` exits hard in the middle of training; the others wait in a collective."""
    model, batch = tiny_gpt_batch()
    engine = shardfx.compile_distributed(model, None, example_inputs=batch, loss_fn=gpt_loss, optimizer=None)
    engine.train_step(*batch)
    if dist.get_rank() == rank_to_die:
        os._exit(3)
    time.sleep(0.5)
    for _ in range(5):
        engine.train_step(*batch)


def sync_and_overlapped() -> tuple[dict, dict]:
    """ZeRO-3 without, then with, bucketing and overlap, from the same start."""
    return train_gpt(3, 3), train_gpt(3, 3, bucket_mb=1.0, overlap=True)


def train_gpt_tp() -> dict:
    """ZeRO-3 over dp=2 on top of tensor parallelism over tp=2."""
    return train_gpt(3, 3, tp_size=2)
