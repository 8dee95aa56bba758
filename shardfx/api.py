"""compile_distributed: capture -> pipeline -> runtime -> Engine."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from shardfx.config import Config
from shardfx.graphs.capture import capture, capture_forward
from shardfx.graphs.program import DistProgram, Mesh, clone_program
from shardfx.passes.manager import PassContext, run_passes
from shardfx.passes.pipeline import pipeline, step_variants, variant_config
from shardfx.runtime.engine import Engine


def compile_distributed(
    model: nn.Module,
    world_size: int | None = None,
    *,
    example_inputs: Sequence[torch.Tensor],
    loss_fn: Callable[..., torch.Tensor] | None = None,
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    config: Config | dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
) -> Engine:
    """Compile `model`'s training step for `world_size` ranks and return an Engine.

    With a loss_fn, loss = loss_fn(model(*batch[:-1]), batch[-1]); without one,
    model(*batch) returns the loss (a tensor, the first element of a tuple, or .loss).
    `optimizer` is a factory called with each rank's local parameters; `scheduler` (optional)
    a factory called with each rank's optimizer, e.g. lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10),
    stepped after every optimizer step. With Config(grad_accum_steps=k), example_inputs is
    one micro-batch (over all ranks); train_step takes k of them stacked.
    """
    config = _check_args(model, world_size, example_inputs, loss_fn, optimizer, config)
    world = _resolve_world_size(world_size)
    batch = tuple(example_inputs)
    if world % config.tp_size != 0:
        raise ValueError(f"world size {world} is not a multiple of Config.tp_size={config.tp_size}")
    dp = world // config.tp_size  # ranks that split the batch; the tp ranks of one dp group share a slice
    _check_batch_split(batch, dp)
    _check_batch_sizes(batch, dp, config)
    if scheduler is not None and not callable(scheduler):
        raise TypeError(
            f"scheduler must be a factory taking a rank's optimizer, or None; got {type(scheduler).__name__}"
        )
    mesh = Mesh.of(dp=dp, tp=config.tp_size) if config.tp_size > 1 else Mesh.of(dp=dp)
    graph_config = variant_config(config)

    variants = step_variants(config)
    accumulate = len(variants) > 1

    def compile_for(batch: tuple[torch.Tensor, ...]) -> tuple[dict[str, DistProgram], list[Any], float]:
        """The variants of the step for this global batch shape, the passes' records and the capture time."""
        # The graph is one rank's step: trace it at the per-rank batch shape.
        local_batch = tuple(x[: x.shape[0] // dp] for x in batch)
        compute_dtype = torch.bfloat16 if config.mixed_precision == "bf16" else None
        captured = capture(model, local_batch, loss_fn, compute_dtype)
        traced = DistProgram(captured.gm, captured.signature, mesh, captured.fake_mode)
        programs: dict[str, DistProgram] = {}
        records: list[Any] = []
        for variant, (grad_accum, replicas) in variants.items():
            program = clone_program(traced) if variant != next(reversed(variants)) else traced
            passes = pipeline(graph_config, mesh, grad_accum=grad_accum, replicas=replicas)
            dump = config.dump_dir if config.dump_dir is None or not accumulate else f"{config.dump_dir}/{variant}"
            ctx = PassContext(graph_config, log or (lambda line: None))
            programs[variant], records = run_passes(program, passes, ctx, dump_dir=dump)
        return programs, records, captured.seconds

    def compile_eval_for(batch: tuple[torch.Tensor, ...]) -> DistProgram:
        """The forward-only program of eval_step: the same passes, on a graph without a backward."""
        local_batch = tuple(x[: x.shape[0] // dp] for x in batch)
        compute_dtype = torch.bfloat16 if config.mixed_precision == "bf16" else None
        captured = capture_forward(model, local_batch, loss_fn, compute_dtype)
        program = DistProgram(captured.gm, captured.signature, mesh, captured.fake_mode)
        eval_config = graph_config.replace(recompute="none", grad_clip=None)
        ctx = PassContext(eval_config, log or (lambda line: None))
        return run_passes(program, pipeline(eval_config, mesh), ctx)[0]

    programs, records, seconds = compile_for(batch)
    program = programs[next(reversed(variants))]
    runtime: Any
    if _launched():
        from shardfx.runtime.distributed import DistributedRuntime

        runtime = DistributedRuntime(program, model, optimizer, timeout=config.collective_timeout)
    else:
        from shardfx.runtime.local import LocalRuntime

        runtime = LocalRuntime(program, model, optimizer, timeout=config.collective_timeout)
    return Engine(
        runtime,
        batch,
        records,
        seconds,
        config=config,
        scheduler=scheduler,
        programs=programs,
        compile_for=lambda new_batch: compile_for(new_batch)[0],
        compile_eval_for=compile_eval_for,
        model=model,
        loss_fn=loss_fn,
        log=log,
    )


def _launched() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _check_args(model: Any, world_size: Any, example_inputs: Any, loss_fn: Any, optimizer: Any, config: Any) -> Config:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if world_size is not None and (isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1):
        raise ValueError(f"world_size must be an integer >= 1 (or None inside a launched job); got {world_size!r}")
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise TypeError(
            f"example_inputs must be a non-empty tuple of tensors (one global batch); got {type(example_inputs).__name__}"
        )
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable or None; got {type(loss_fn).__name__}")
    if optimizer is not None and (isinstance(optimizer, torch.optim.Optimizer) or not callable(optimizer)):
        raise TypeError(
            "optimizer must be a factory that takes a rank's local parameters and returns a torch.optim.Optimizer, "
            f"e.g. lambda params: torch.optim.AdamW(params, lr=1e-3); got {type(optimizer).__name__}"
        )
    if config is None:
        return Config()
    if isinstance(config, dict):
        return Config.from_dict(config)
    if not isinstance(config, Config):
        raise TypeError(f"config must be a shardfx.Config or a dict; got {type(config).__name__}")
    return config


def _resolve_world_size(world_size: int | None) -> int:
    """world_size, or the launched process group's size (and they must agree when both are there)."""
    import torch.distributed as dist

    if not _launched():
        if world_size is None:
            raise ValueError(
                "world_size=None needs an initialized torch.distributed process group (start with torchrun)"
            )
        return world_size
    launched = dist.get_world_size()
    if world_size is not None and world_size != launched:
        raise ValueError(f"world_size={world_size} but this job was launched with {launched} ranks")
    return launched


def _check_batch_split(batch: tuple[Any, ...], dp: int) -> None:
    for i, x in enumerate(batch):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"example_inputs[{i}] must be a tensor; got {type(x).__name__}")
        if x.dim() == 0:
            raise ValueError(f"example_inputs[{i}] is a scalar; every batch element needs a batch dim 0 to split")
        if x.shape[0] % dp != 0:
            raise ValueError(
                f"example_inputs[{i}] has batch size {x.shape[0]} (dim 0), which does not divide into "
                f"{dp} data-parallel ranks; use a batch size that is a multiple of {dp}"
            )


def _check_batch_sizes(batch: tuple[Any, ...], dp: int, config: Config) -> None:
    """The example batch against Config.micro_batch_size / train_batch_size (set e.g. from a DeepSpeed config)."""
    rows = batch[0].shape[0]
    if config.micro_batch_size is not None and rows != config.micro_batch_size * dp:
        raise ValueError(
            f"example_inputs has batch size {rows}; Config.micro_batch_size={config.micro_batch_size} on {dp} ranks "
            f"needs {config.micro_batch_size * dp}"
        )
    total = rows * config.grad_accum_steps
    if config.train_batch_size is not None and total != config.train_batch_size:
        raise ValueError(
            f"Config.train_batch_size={config.train_batch_size}, but example_inputs' batch of {rows} x "
            f"grad_accum_steps={config.grad_accum_steps} is {total}"
        )
