"""Single-process eager training as the reference every pipeline is compared with."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn

import shardfx

RTOL = 1e-5  # fp32 parity, as the issues state
ATOL = 1e-5  # torch.testing's default fp32 atol: entries near 0, where AdamW amplifies rounding noise


def adamw(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


def eager_train(model: nn.Module, batch: tuple, loss_fn: Callable | None, steps: int, optimizer=adamw, grad_clip=None):
    model = copy.deepcopy(model)
    opt = optimizer(list(model.parameters()))
    losses = []
    for _ in range(steps):
        if loss_fn is None:
            out = model(*batch)
            loss = shardfx.graphs.capture.extract_loss(out)
        else:
            loss = loss_fn(model(*batch[:-1]), batch[-1])
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses), model.state_dict()


def eager_norms(model, batch, loss_fn, steps, max_norm, optimizer=adamw):  # type: ignore[no-untyped-def]
    """The total gradient norm clip_grad_norm_ returns at each of `steps` eager steps (loss_fn(model(*batch[:-1]), batch[-1]))."""
    model = copy.deepcopy(model)
    opt = optimizer(list(model.parameters()))
    norms = []
    for _ in range(steps):
        loss_fn(model(*batch[:-1]), batch[-1]).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return norms


def shardfx_train(model, batch, loss_fn, steps, world_size, config=None, optimizer=adamw):
    engine = shardfx.compile_distributed(
        copy.deepcopy(model),
        world_size,
        example_inputs=batch,
        loss_fn=loss_fn,
        optimizer=optimizer,
        config=config,
    )
    losses = torch.stack([engine.train_step(*batch) for _ in range(steps)])
    return losses, engine.state_dict(), engine


def assert_parity(model, batch, loss_fn, world_size, config=None, steps=5, rtol=RTOL, atol=ATOL, optimizer=adamw):
    grad_clip = config.grad_clip if isinstance(config, shardfx.Config) else None
    ref_losses, ref_state = eager_train(model, batch, loss_fn, steps, optimizer, grad_clip)
    losses, state, engine = shardfx_train(model, batch, loss_fn, steps, world_size, config, optimizer)
    torch.testing.assert_close(losses, ref_losses, rtol=rtol, atol=atol)
    assert list(state) == list(ref_state), "state_dict keys differ from model.state_dict()"
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}")
    return engine
