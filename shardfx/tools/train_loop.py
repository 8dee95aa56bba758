"""One rank's `shardfx train`: build the model, compile, loop over the steps, save and resume checkpoints.

The options come from tools/train.py (which also starts the workers); the
lines it prints are made by tools/train_report.py.
"""

from __future__ import annotations

import base64
import json
import os
import time
from typing import Any

import torch
from tqdm import tqdm

import shardfx
from shardfx.models import build_model, num_params
from shardfx.tools.options import DEFAULT_PRESET, model_kwargs
from shardfx.tools.train_options import TrainOptions, is_factory, train_config
from shardfx.tools.train_report import (
    LAST_WINDOW,
    footer,
    header,
    items_per_batch,
    loss_floor,
    model_config,
    step_line,
)


def latest_checkpoint(checkpoint_dir: str) -> str:
    """The folder CHECKPOINT_DIR/latest names; a clear error when there is none."""
    pointer = os.path.join(checkpoint_dir, "latest")
    if not os.path.isfile(pointer):
        raise ValueError(
            f"--resume: no checkpoint in {checkpoint_dir!r} (no 'latest' file); run with --save-every first"
        )
    with open(pointer) as f:
        return os.path.join(checkpoint_dir, f.read().strip())


def _save(engine: shardfx.Engine, options: TrainOptions, generator: torch.Generator, rank0: bool) -> str:
    """Checkpoint into CHECKPOINT_DIR/step-NNNNNN, then point CHECKPOINT_DIR/latest at it (atomically)."""
    name = f"step-{engine.steps:06d}"
    state = {"generator": base64.b64encode(generator.get_state().numpy().tobytes()).decode()}
    engine.save_checkpoint(os.path.join(options.checkpoint_dir, name), client_state=state)
    if rank0:
        tmp = os.path.join(options.checkpoint_dir, "latest.tmp")
        with open(tmp, "w") as f:
            f.write(name + "\n")
        os.replace(tmp, os.path.join(options.checkpoint_dir, "latest"))
    return name


def _resume(engine: shardfx.Engine, options: TrainOptions, generator: torch.Generator) -> str:
    path = latest_checkpoint(options.checkpoint_dir)
    state = engine.load_checkpoint(path)
    generator.set_state(torch.frombuffer(bytearray(base64.b64decode(state["generator"])), dtype=torch.uint8))
    return path


def train_here(options: TrainOptions, echo: Any) -> dict[str, Any]:
    """Train with the runtime of this process: threads (local), or this rank of a launched job."""
    say = echo or (lambda line: None)
    config = train_config(options)
    model, loss_fn, make_batch, kwargs = _build(options)
    floor, uniform = (None, None) if is_factory(options.model) else loss_floor(options.model, model, kwargs)
    generator = torch.Generator().manual_seed(options.seed)
    example = make_batch(options.batch_size, generator)
    # With accumulation the step is compiled for one micro-batch; train_step takes all of them.
    micro = tuple(x[: x.shape[0] // config.grad_accum_steps] for x in example)

    say(f"compiling {options.model} for {options.world_size} ranks ...")
    t0 = time.perf_counter()
    engine = shardfx.compile_distributed(
        model,
        options.world_size,
        example_inputs=micro,
        loss_fn=loss_fn,
        optimizer=lambda params: torch.optim.AdamW(params, lr=options.lr),
        config=config,
    )
    compile_seconds = time.perf_counter() - t0
    resumed = _resume(engine, options, generator) if options.resume else None
    if engine.steps >= options.steps:
        raise ValueError(
            f"the checkpoint {resumed} is at step {engine.steps}; --steps {options.steps} leaves nothing to train"
        )
    summary: dict[str, Any] = {
        "model": options.model,
        "preset": options.preset or DEFAULT_PRESET.get(options.model),
        "model_args": kwargs,
        "model_config": model_config(model),
        "params": num_params(model),
        "world_size": options.world_size,
        "mesh": str(engine.program.mesh),
        "pipeline": None if config.pp_size == 1 else f"{config.pp_schedule}, {config.pp_microbatches} micro-batches",
        "runtime": options.runtime,
        "zero_stage": config.zero_stage,
        "grad_accum_steps": config.grad_accum_steps,
        "deepspeed_unsupported": getattr(config, "deepspeed_unsupported", None),
        "resumed_from": resumed,
        "start_step": engine.steps,
        "passes": [r.name for r in engine.pass_records if not r.skipped],
        "graph_nodes": len(engine.program.graph.nodes),
        "compile_seconds": compile_seconds,
        "steps": options.steps,
        "batch_size": options.batch_size,
        "lr": options.lr,
        "seed": options.seed,
        "floor": floor,
        "uniform_loss": uniform,
    }
    say(header(summary))
    try:
        losses, step_seconds, total_seconds, saved = _loop(engine, make_batch, generator, example, options, floor, say)
    finally:
        close = getattr(engine.runtime, "close", None)
        if close is not None:
            close()
    items, unit = items_per_batch(example[0])
    summary.update(
        first_loss=losses[0],
        last_loss=sum(losses[-LAST_WINDOW:]) / len(losses[-LAST_WINDOW:]),
        last_window=len(losses[-LAST_WINDOW:]),
        train_seconds=total_seconds,
        total_seconds=compile_seconds + total_seconds,
        throughput=items * len(losses) / step_seconds,
        throughput_unit=unit,
        losses=losses,
        skipped_steps=engine.skipped_steps,
        checkpoints=saved,
        memory_per_rank=engine.stats()["memory"],
    )
    say(footer(summary))
    if options.json_path:
        with open(options.json_path, "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
        say(f"summary written to {options.json_path}")
    return summary


def _build(options: TrainOptions) -> tuple[torch.nn.Module, Any, Any, dict[str, Any]]:
    """(model, loss_fn, make_batch(n, generator), builder kwargs) of a built-in model or a file.py:factory."""
    if is_factory(options.model):
        from shardfx.tools.model_spec import load_model_spec

        spec = load_model_spec(options.model, options.preset, options.overrides, seed=options.seed)
        return spec.model, spec.loss_fn, lambda n, generator: spec.batch, spec.kwargs  # a factory has one batch
    kwargs = model_kwargs(options.model, options.preset, options.overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)  # build_model initialises parameters from the global RNG
        model, loss_fn, make_batch = build_model(options.model, **kwargs)
    return model, loss_fn, make_batch, kwargs


def _loop(
    engine: shardfx.Engine,
    make_batch: Any,
    generator: torch.Generator,
    first: tuple,
    options: TrainOptions,
    floor: float | None,
    say: Any,
) -> tuple[list[float], float, float, list[str]]:
    """Run the steps from engine.steps on; returns losses, seconds in train_step, loop wall seconds, checkpoints."""
    import torch.distributed as dist

    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    items, unit = items_per_batch(first[0])
    losses: list[float] = []
    saved: list[str] = []
    step_seconds = 0.0
    start = time.perf_counter()
    bar = tqdm(
        range(engine.steps, options.steps),
        initial=engine.steps,
        total=options.steps,
        desc="train",
        unit="step",
        disable=not options.progress,
        dynamic_ncols=True,
    )
    for step in bar:
        batch = first if step == 0 else make_batch(options.batch_size, generator)
        t0 = time.perf_counter()
        loss = engine.train_step(*batch).item()
        dt = time.perf_counter() - t0
        step_seconds += dt
        losses.append(loss)
        postfix = {"loss": f"{loss:.3f}", unit: f"{items / dt:,.0f}"}
        if floor is not None:
            postfix["floor"] = f"{floor:.3f}"
        bar.set_postfix(postfix, refresh=False)
        if options.log_every and (step + 1) % options.log_every == 0:
            line = step_line(engine, step + 1, loss, items / dt, unit)
            bar.write(line) if options.progress else say(line)
        if options.save_every and ((step + 1) % options.save_every == 0 or step + 1 == options.steps):
            saved.append(_save(engine, options, generator, rank0))
    bar.close()
    return losses, step_seconds, time.perf_counter() - start, saved
