"""Build, fuse and lower small captured programs; run them in one process."""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from shardfx.config import Config
from shardfx.graphs.capture import capture
from shardfx.graphs.program import DistProgram, Mesh
from shardfx.graphs.signature import BUFFER, PARAM
from shardfx.passes.fuse import fuse
from shardfx.passes.lower_to_triton import lower_to_triton
from shardfx.passes.manager import Pass, PassContext, run_passes


def kernel_passes(cache_dir: str | Path) -> list[Pass]:
    return [
        Pass("fuse", fuse, "regions of memory-bound ops", exact=False),
        Pass("lower_to_triton", partial(lower_to_triton, cache_dir=cache_dir), "one Triton kernel each", exact=False),
    ]


def captured(model: nn.Module, batch: tuple, loss_fn: Callable | None, dtype: torch.dtype | None = None) -> DistProgram:
    c = capture(model, batch, loss_fn, dtype)
    return DistProgram(c.gm, c.signature, Mesh.of(dp=1), c.fake_mode)


def lowered(program: DistProgram, cache_dir: str | Path) -> tuple[DistProgram, list]:
    program = DistProgram(copy.deepcopy(program.gm), program.signature, program.mesh, program.fake_mode)
    return run_passes(program, kernel_passes(cache_dir), PassContext(Config()))


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
