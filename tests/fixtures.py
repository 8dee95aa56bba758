"""Models and batches several test files share (import from here, never from a test file)."""

from __future__ import annotations

import contextlib
import io

import torch
import torch.nn as nn

from shardfx.models import GPT, GPTConfig

# bf16 has an 8-bit mantissa (relative rounding 2^-9 ~ 0.2%); over 10 AdamW steps the loss of
# the tiny GPT stays within 2% of fp32 eager training (measured: 0.4%).
BF16_LOSS_RTOL = 2e-2


def mlp_batch(batch: int = 12, d_in: int = 16, d_out: int = 8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, d_in, generator=g), torch.randn(batch, d_out, generator=g)


# GPT without biases: the key projection's bias has a gradient that is zero in exact
# arithmetic (softmax ignores a constant added to every score), so AdamW turns its
# rounding noise into full-size updates and no two reduction orders agree on it.
def tiny_gpt(tie: bool = True) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, n_layer=2, d_model=32, n_head=2, seq_len=16, tie_weights=tie, bias=False))


def gpt_batch(batch: int = 12):
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 64, (batch, 16), generator=g), torch.randint(0, 64, (batch, 16), generator=g)


class FrozenFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(16, 37)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(37, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.frozen(x)))


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """`shardfx ARGV` in this process: (exit code, stdout, stderr)."""
    from shardfx.tools.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


# Config options for a step without bucketing or overlap (the cost model plans both by default):
# for tests of what a sharding pass itself produces, one collective per parameter, synchronous.
UNPLANNED = {"bucket_mb": 0.0, "overlap": False}
