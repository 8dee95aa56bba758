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
    """`steps` optimizer steps on the tiny GPT's batch (cut into grad_accum_steps micro-batches)."""
    model, batch = tiny_gpt_batch()
    k = int(config.get("grad_accum_steps", 1))
    engine = shardfx.compile_distributed(
        model,
        None,
        example_inputs=tuple(x[: x.shape[0] // k] for x in batch),
        loss_fn=gpt_loss,
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        config=shardfx.Config(zero_stage=zero_stage, **config),
    )
    losses = [engine.train_step(*batch).item() for _ in range(steps)]
    stats = engine.stats()  # the last step's collectives (state_dict below gathers too)
    return {"losses": losses, "state": engine.state_dict(), "stats": stats, "rank": dist.get_rank()}


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


ACCUMULATED = {"grad_accum_steps": 2, "bucket_mb": 1.0, "overlap": True}


def train_gpt_accumulated() -> dict:
    """ZeRO-2 over 2 micro-batches a step, bucketed and overlapped."""
    return train_gpt(2, 3, **ACCUMULATED)


def _gpt_engine(**config: object) -> tuple[shardfx.Engine, tuple]:
    model, batch = tiny_gpt_batch()
    engine = shardfx.compile_distributed(
        model,
        None,
        example_inputs=batch,
        loss_fn=gpt_loss,
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        config=shardfx.Config(**config),
    )
    return engine, batch


def save_and_reload_tp(path: str) -> dict:
    """dp=2 x tp=2, ZeRO-3: train 2 steps, save; a fresh engine loads it; both take one more step."""
    engine, batch = _gpt_engine(zero_stage=3, tp_size=2)
    for _ in range(2):
        engine.train_step(*batch)
    engine.save_checkpoint(path)
    saved = engine.state_dict()
    fresh, _ = _gpt_engine(zero_stage=3, tp_size=2)
    fresh.load_checkpoint(path)
    loaded = fresh.state_dict()
    return {
        "saved": saved,
        "loaded": loaded,
        "next": [engine.train_step(*batch).item(), fresh.train_step(*batch).item()],
    }


def load_state(path: str, zero_stage: int) -> dict:
    engine, _ = _gpt_engine(zero_stage=zero_stage)
    engine.load_checkpoint(path)
    return engine.state_dict()


def train_gpt_pipeline(path: str) -> dict:
    """dp2 x pp2 (ZeRO-1, the embedding tied to the head), 1F1B over 2 micro-batches, SGD with momentum:
    3 steps, a checkpoint to `path`, one more step."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=2, d_model=32, n_head=2, seq_len=16, bias=False, tie_weights=True))
    g = torch.Generator().manual_seed(2)
    batch = torch.randint(0, 64, (8, 16), generator=g), torch.randint(0, 64, (8, 16), generator=g)
    engine = shardfx.compile_distributed(
        model,
        None,
        example_inputs=batch,
        loss_fn=gpt_loss,
        optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        config=shardfx.Config(zero_stage=1, pp_size=2, pp_microbatches=2, grad_clip=1.0),
    )
    losses = [engine.train_step(*batch).item() for _ in range(3)]
    stats = engine.stats()
    out = {"losses": losses, "state": engine.state_dict(), "stats": stats, "norm": engine.last_grad_norm}
    engine.save_checkpoint(path)
    engine.train_step(*batch)
    out["after"] = engine.state_dict()
    return out
