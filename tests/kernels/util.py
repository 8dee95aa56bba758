"""Build, fuse and lower small captured programs; run them in one process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from shardfx.config import Config
from shardfx.driver import Traced, build_mesh, capture_step, compile_traced
from shardfx.graphs.program import DistProgram
from shardfx.graphs.signature import BUFFER, PARAM
from shardfx.passes.manager import Pass
from shardfx.passes.pipeline import FUSE, LOWER_TO_TRITON


def kernel_passes(cache_dir: str | Path) -> list[Pass]:
    """The pipeline's own fuse and lower_to_triton entries (their contracts included)."""
    return [FUSE, LOWER_TO_TRITON.bind(cache_dir=cache_dir)]


def captured(model: nn.Module, batch: tuple, loss_fn: Callable | None, dtype: torch.dtype | None = None) -> DistProgram:
    """The step captured by the compile driver on one rank (dtype: the compute dtype, bf16 or None)."""
    config = Config(mixed_precision="bf16" if dtype == torch.bfloat16 else None)
    assert dtype in (None, torch.float32, torch.bfloat16), dtype
    return capture_step(model, batch, loss_fn, config, build_mesh(config, 1)).program


def lowered(program: DistProgram, cache_dir: str | Path) -> tuple[DistProgram, list]:
    """A copy of `program` after fuse and lower_to_triton only (through the driver)."""
    compiled = compile_traced(Traced(program, 0.0), Config(), passes=kernel_passes(cache_dir))
    return compiled.program, compiled.records[compiled.last]


def run(program: DistProgram, model: nn.Module, batch: tuple, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    args = []
    for spec in program.signature.inputs:
        if spec.role == PARAM:
            p = params[spec.name].detach()
            args.append(p.to(dtype) if dtype is not None else p)
        elif spec.role == BUFFER:
            args.append(buffers[spec.name])
        else:
            args.append(batch[spec.batch_index])
    with torch.no_grad():
        return list(program.gm(*args))


# One memory-bound op between a Linear and a loss, on odd shapes (test_regions, test_cache).
ROWS, COLS = 37, 129


class Head(nn.Module):
    def __init__(self, op: str, cols: int = COLS) -> None:
        super().__init__()
        self.op = op
        self.fc = nn.Linear(cols, cols)
        self.ln = nn.LayerNorm(cols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (ROWS, COLS)
        if self.op == "layer_norm":
            return self.ln(h + x)  # residual add + layer norm
        if self.op == "gelu_tanh":
            return F.gelu(h, approximate="tanh")
        if self.op == "gelu":
            return F.gelu(h)
        if self.op == "softmax":
            return torch.softmax(h, dim=-1)
        return h  # logits for cross-entropy


def mse_to(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def cross_entropy(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, target)


def region_case(op: str) -> tuple[nn.Module, tuple, object]:
    torch.manual_seed(0)
    model = Head(op)
    x = torch.randn(ROWS, COLS)
    if op == "cross_entropy":
        return model, (x, torch.randint(0, COLS, (ROWS,))), cross_entropy
    return model, (x, torch.randn(ROWS, COLS)), mse_to
