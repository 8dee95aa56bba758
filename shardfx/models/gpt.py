"""A GPT-style decoder-only transformer, written to be captured by torch.export.

Pre-LN blocks, learned positions, optional weight tying between the token
embedding and the output head, no dropout (so eager and compiled runs are
bit-comparable). Nothing in forward branches on tensor values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    """Sizes of a GPT; `seq_len` is the longest sequence the position table covers."""

    vocab_size: int = 1024
    n_layer: int = 4
    d_model: int = 256
    n_head: int = 4
    seq_len: int = 128
    tie_weights: bool = True
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "d_model", "n_head", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig {name} must be an integer >= 1; got {value!r} ({type(value).__name__})")
        for name in ("tie_weights", "bias"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"GPTConfig {name} must be True or False; got {value!r} ({type(value).__name__})")
        if self.n_head <= 0 or self.d_model % self.n_head != 0:
            raise ValueError(
                f"d_model must be divisible by n_head (a positive count of heads); "
                f"got d_model={self.d_model}, n_head={self.n_head}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with one fused qkv projection."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)  # 3 x (B, T, D)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).contiguous().view(B, T, D)  # (B, T, D)
        return self.proj(y)


class FeedForward(nn.Module):
    """The position-wise MLP of a block: d -> 4d -> d."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, 4 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(4 * config.d_model, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))  # (B, T, D)


class Block(nn.Module):
    """One pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp = FeedForward(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token + position embeddings, `n_layer` blocks, a final LayerNorm and a vocab head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_weights:
            # One Parameter object under two names; passes must treat it as one tensor.
            self.head.weight = self.wte.weight
        self.apply(_init_weights)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: LongTensor (B, T) with T <= seq_len -> logits (B, T, vocab_size)."""
        T = tokens.shape[1]
        if T > self.config.seq_len:
            raise ValueError(f"sequence length {T} exceeds config.seq_len={self.config.seq_len}")
        pos = torch.arange(T, device=tokens.device)  # (T,)
        x = self.wte(tokens) + self.wpe(pos)  # (B, T, D); positions broadcast over B
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, T, vocab_size)


def _init_weights(module: nn.Module) -> None:
    # Small-normal init keeps initial logits near uniform (loss ~ log(vocab)).
    # LayerNorm keeps its default ones/zeros.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def gpt_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; the `loss_fn(output, targets)` for GPT."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())  # (B*T, V) vs (B*T,)


def num_params(model: nn.Module) -> int:
    """Number of parameter elements, counting a tied parameter once."""
    # Module.parameters() already yields each Parameter object once.
    return sum(p.numel() for p in model.parameters())
