"""Named models for the CLI and tests: a name (plus overrides) -> model, loss, data.

`build_model` returns `(model, loss_fn, make_batch)`:
  - `loss_fn(output, targets)` -> scalar loss (None would mean the model returns its loss);
  - `make_batch(batch_size, generator)` -> `(inputs, targets)`, a fresh batch
    drawn from `generator`, so a run is reproducible from one seed.
Adding a model means adding one builder and one row to `_BUILDERS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardfx.models.data import MarkovTokens
from shardfx.models.gpt import GPT, GPTConfig, gpt_loss
from shardfx.models.mlp import MLP

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
MakeBatch = Callable[[int, torch.Generator], tuple]
Built = tuple[nn.Module, LossFn | None, MakeBatch]

GPT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"vocab_size": 64, "n_layer": 2, "d_model": 32, "n_head": 2, "seq_len": 16},
    "base": {},  # the GPTConfig defaults
}


def _build_mlp(
    *,
    d_in: int = 16,
    hidden: tuple[int, ...] = (32, 32),
    d_out: int = 8,
    batchnorm: bool = False,
    bias: bool = True,
    data_seed: int = 0,
) -> Built:
    """MLP regressing onto a fixed random teacher y = tanh(x @ W), so the loss can fall."""
    model = MLP(d_in=d_in, hidden=hidden, d_out=d_out, batchnorm=batchnorm, bias=bias)
    teacher = torch.randn(d_in, d_out, generator=torch.Generator().manual_seed(data_seed)) / d_in**0.5

    def make_batch(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(batch_size, d_in, generator=generator)  # (B, d_in)
        return x, torch.tanh(x @ teacher)  # (B, d_out)

    return model, F.mse_loss, make_batch


def gpt_config(*, preset: str = "tiny", data_seed: int = 0, **config_overrides: Any) -> GPTConfig:
    """The GPTConfig of a preset with overrides (data_seed is the synthetic data's, not the model's).

    `shardfx train --data` builds the GPT from this alone: the Markov chain of _build_gpt costs
    vocab_size^2 float64s (20 GB at GPT-2's 50,257)."""
    if preset not in GPT_PRESETS:
        raise ValueError(f"unknown GPT preset {preset!r}; allowed: {sorted(GPT_PRESETS)}")
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = set(config_overrides) - fields
    if unknown:
        raise ValueError(
            f"unknown GPT overrides {sorted(unknown)}; allowed: {sorted(fields | {'preset', 'data_seed'})}"
        )
    if isinstance(data_seed, bool) or not isinstance(data_seed, int):
        raise ValueError(f"data_seed must be an integer; got {data_seed!r} ({type(data_seed).__name__})")
    return GPTConfig(**{**GPT_PRESETS[preset], **config_overrides})


def _build_gpt(*, preset: str = "tiny", data_seed: int = 0, **config_overrides: Any) -> Built:
    """GPT on MarkovTokens with the same vocabulary; its loss floor is data.entropy_rate()."""
    config = gpt_config(preset=preset, data_seed=data_seed, **config_overrides)
    data = MarkovTokens(vocab_size=config.vocab_size, seed=data_seed)

    def make_batch(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return data.batch(batch_size, config.seq_len, generator)  # (B, T), (B, T)

    return GPT(config), gpt_loss, make_batch


_BUILDERS: dict[str, Callable[..., Built]] = {
    "mlp": _build_mlp,
    "gpt": _build_gpt,
}


def build_model(name: str, **overrides: Any) -> Built:
    """Build a named model with its loss and batch sampler; parameters use torch's global RNG.

    >>> model, loss_fn, make_batch = build_model("gpt", preset="tiny")
    >>> tokens, targets = make_batch(8, torch.Generator().manual_seed(0))
    >>> loss = loss_fn(model(tokens), targets)
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; allowed: {sorted(_BUILDERS)}")
    return _BUILDERS[name](**overrides)
