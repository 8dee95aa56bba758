"""compile_distributed: the compile driver (mesh, capture, pipeline) -> runtime -> Engine."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from shardfx.config import Config
from shardfx.driver import build_mesh, check_batch, compile_eval, compile_step, pipeline_holders
from shardfx.graphs.program import PIPELINE, PLAN
from shardfx.runtime.engine import Engine, EngineOptions, logger


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
    model(*batch) returns the loss (a tensor, a tuple holding it as its first floating-point
    scalar, or .loss); the same tuple rule applies to what a loss_fn returns.
    `optimizer` is a factory called with each rank's local parameters; `scheduler` (optional)
    a factory called with each rank's optimizer, e.g. lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10),
    stepped after every optimizer step. With Config(grad_accum_steps=k), example_inputs is
    one micro-batch (over all ranks); train_step takes k of them stacked.
    With Config(plan="auto"), the planner (shardfx/planner.py) chooses the Config first; the plan
    is logged, kept as `engine.plan` and in engine.stats()["plan"].
    """
    config = _check_args(model, world_size, example_inputs, loss_fn, optimizer, config)
    batch = tuple(example_inputs)
    ranks = _resolve_world_size(world_size)  # a wrong world size fails before the machine is measured
    if _launched():
        from shardfx.tools.calibrate import calibrate_once

        # the first gloo job at this rank count on this machine measures it for the cost model
        calibrate_once(config.hardware, log or logger.warning)
    plan = None
    if config.plan == "auto":
        from shardfx.planner import plan_step

        plan = plan_step(model, batch, loss_fn, config, ranks, log=logger.debug)
        (log or logger.warning)(plan.describe())
        config = plan.config
    mesh = build_mesh(config, ranks)
    check_batch(batch, mesh, config)
    _check_batch_sizes(batch, mesh.size("dp"), config)
    if scheduler is not None and not callable(scheduler):
        raise TypeError(
            f"scheduler must be a factory taking a rank's optimizer, or None; got {type(scheduler).__name__}"
        )
    if plan is None:
        compiled = compile_step(model, batch, loss_fn, config, mesh, log=log)
    else:
        compiled = plan.compiled
        for p in compiled.programs.values():
            p.notes[PLAN] = plan.as_dict()
    program = compiled.program
    runtime: Any
    schedule = compiled.schedule
    holders = pipeline_holders(compiled) if compiled.pipeline is not None else None
    # A new batch shape keeps the stages the ranks hold: the cost model would weigh it anew and
    # might cut elsewhere, so later compiles cut where this one did.
    recompile = config
    if holders is not None:
        recompile = config.replace(pp_split=tuple(compiled.program.notes[PIPELINE]["starts"][1:]))
    if compiled.pipeline is not None:
        from shardfx.graphs.program import Schedule
        from shardfx.runtime.pipeline import DistributedPipelineRuntime, LocalPipelineRuntime

        runtime = (DistributedPipelineRuntime if _launched() else LocalPipelineRuntime)(
            compiled.programs,
            compiled.pipeline,
            model,
            optimizer,
            timeout=config.collective_timeout,
            grad_clip=config.grad_clip,
        )
        schedule = Schedule(("step",), frozenset({"step"}))  # the engine's view: one call, one optimizer step
    elif _launched():
        from shardfx.runtime.distributed import DistributedRuntime

        runtime = DistributedRuntime(program, model, optimizer, timeout=config.collective_timeout)
    else:
        from shardfx.runtime.local import LocalRuntime

        runtime = LocalRuntime(program, model, optimizer, timeout=config.collective_timeout)
    options = EngineOptions(
        example_inputs=batch,
        programs=compiled.programs,
        schedule=schedule,
        config=config,
        records=compiled.records[compiled.last],
        capture_seconds=compiled.capture_seconds,
        scheduler=scheduler,
        compile_for=lambda new_batch: compile_step(model, new_batch, loss_fn, recompile, mesh, log=log).programs,
        compile_eval_for=lambda new_batch: compile_eval(
            model, new_batch, loss_fn, config, mesh, log=log, holders=holders
        ),
        model=model,
        loss_fn=loss_fn,
        log=log,
    )
    engine = Engine(runtime, options)
    engine.plan = plan
    return engine


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


def _check_batch_sizes(batch: tuple[Any, ...], dp: int, config: Config) -> None:
    """The example batch against Config.micro_batch_size / train_batch_size (set e.g. from a DeepSpeed config)."""
    rows = batch[0].shape[0]
    micro = config.pp_microbatches if config.pp_size > 1 else 1  # a pipeline's example batch is the whole step's
    if config.micro_batch_size is not None and rows != config.micro_batch_size * dp * micro:
        pipeline = f" x {micro} pipeline micro-batches" if micro > 1 else ""
        raise ValueError(
            f"example_inputs has batch size {rows}; Config.micro_batch_size={config.micro_batch_size} on {dp} ranks"
            f"{pipeline} needs {config.micro_batch_size * dp * micro}"
        )
    total = rows * config.grad_accum_steps
    if config.train_batch_size is not None and total != config.train_batch_size:
        raise ValueError(
            f"Config.train_batch_size={config.train_batch_size}, but example_inputs' batch of {rows} x "
            f"grad_accum_steps={config.grad_accum_steps} is {total}"
        )
