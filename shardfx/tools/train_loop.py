"""One rank's `shardfx train`: build the model, compile, loop over the steps, save and resume checkpoints.

The options come from tools/train.py (which also starts the workers); the
lines it prints are made by tools/train_report.py.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

import shardfx
from shardfx.models import GPT, TokenFile, TokenSplit, build_model, gpt_loss, num_params, open_tokens
from shardfx.tools.options import DEFAULT_PRESET, model_kwargs
from shardfx.tools.train_options import (
    TrainOptions,
    data_vocab_from,
    deepspeed_setup,
    factory_block_size,
    gpt_config,
    is_factory,
    trace_at,
    train_config,
)
from shardfx.tools.train_report import (
    BAR_FORMAT,
    LAST_WINDOW,
    PeakMemory,
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
    built = _build(options)
    model, loss_fn, make_batch, kwargs = built.model, built.loss_fn, built.make_batch, built.kwargs
    if is_factory(options.model):
        floor, uniform = None, None
    else:
        floor, uniform = loss_floor(options.model, model, kwargs, data=options.data is not None)
    generator = torch.Generator().manual_seed(options.seed)
    example = make_batch(options.batch_size, generator)
    # With accumulation the step is compiled for one micro-batch; train_step takes all of them.
    micro = tuple(x[: x.shape[0] // config.grad_accum_steps] for x in example)

    setup = deepspeed_setup(options)
    optimizer = setup.optimizer if setup is not None and setup.optimizer is not None else None
    optimizer_text = setup.optimizer_text if optimizer is not None else f"AdamW(lr={options.lr})"
    say(f"compiling {options.model} for {options.world_size} ranks ...")
    t0 = time.perf_counter()
    engine = shardfx.compile_distributed(
        model,
        options.world_size,
        example_inputs=micro,
        loss_fn=loss_fn,
        optimizer=optimizer or (lambda params: torch.optim.AdamW(params, lr=options.lr)),
        scheduler=setup.scheduler if setup is not None else None,
        config=config,
    )
    compile_seconds = time.perf_counter() - t0
    resumed = _resume(engine, options, generator) if options.resume else None
    if engine.steps >= options.steps:
        raise ValueError(
            f"the checkpoint {resumed} is at step {engine.steps}; --steps {options.steps} leaves nothing to train"
        )
    traced_step = trace_at(options, engine.steps) if options.trace_path else None
    evaluate = None
    if options.eval_every:
        assert built.val is not None  # check_data refused --eval-every without a validation split
        # Fixed batches of the compiled micro-batch size: the same windows at every evaluation and in every run.
        val_batches = [
            built.cast(b) for b in built.val.fixed_batches(options.eval_batches, micro[0].shape[0], built.block_size)
        ]

        def evaluate() -> float:
            return sum(engine.eval_step(*b).item() for b in val_batches) / len(val_batches)

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
        "deepspeed_ignored": getattr(config, "deepspeed_ignored", None),
        "optimizer": optimizer_text,
        "scheduler": setup.scheduler_text if setup is not None else None,
        "mixed_precision": config.mixed_precision,
        "loss_scale": None if engine.loss_scaler is None else engine.loss_scaler.scale,
        "dynamic_loss_scale": engine.loss_scaler is not None and engine.loss_scaler.dynamic,
        "resumed_from": resumed,
        "start_step": engine.steps,
        "passes": [r.name for r in engine.pass_records if not r.skipped],
        "graph_nodes": len(engine.program.graph.nodes),
        "compile_seconds": compile_seconds,
        "steps": options.steps,
        "batch_size": example[0].shape[0],
        "lr": options.lr,
        "seed": options.seed,
        "floor": floor,
        "uniform_loss": uniform,
        "data": built.data_summary(model),
        "eval_every": options.eval_every,
        "eval_batches": options.eval_batches if options.eval_every else None,
    }
    say(header(summary))
    peak = PeakMemory(engine)
    try:
        run = _loop(engine, make_batch, generator, example, options, peak, evaluate, say, traced_step)
    finally:
        close = getattr(engine.runtime, "close", None)
        if close is not None:
            close()
    items, unit = items_per_batch(example[0])
    losses = run.losses
    window = losses[-LAST_WINDOW:]
    summary.update(
        first_loss=losses[0] if losses else None,
        last_loss=sum(window) / len(window) if window else None,
        last_window=len(window),
        val_loss=run.val_losses[-1][1] if run.val_losses else None,
        val_losses=run.val_losses,
        train_seconds=run.total_seconds,
        total_seconds=compile_seconds + run.total_seconds,
        throughput=items * len(losses) / run.step_seconds if losses else 0.0,
        throughput_unit=unit,
        losses=losses,
        skipped_steps=engine.skipped_steps,
        checkpoints=run.saved,
        interrupted_at=run.interrupted_at,
        trace=run.trace,
        memory_per_rank=engine.stats()["memory"],
        peak_bytes=peak.read(),
        peak_kind=peak.kind,
    )
    say(footer(summary))
    if options.json_path:
        with open(options.json_path, "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
        say(f"summary written to {options.json_path}")
    return summary


@dataclass
class _Built:
    """A model ready to compile with its batches; `val`, `cast` and `tokens` only with --data."""

    model: torch.nn.Module
    loss_fn: Any
    make_batch: Any  # make_batch(n, generator) -> a global batch
    kwargs: dict[str, Any]
    tokens: TokenFile | None = None
    train_tokens: int = 0
    val: TokenSplit | None = None
    block_size: int = 0
    cast: Any = None  # batch -> batch in the dtypes the model was given
    vocab_from: str = ""

    def data_summary(self, model: torch.nn.Module) -> dict[str, Any] | None:
        if self.tokens is None:
            return None
        config = getattr(model, "config", None)
        return {
            "path": self.tokens.path,
            "dtype": self.tokens.dtype,
            "tokens": len(self.tokens.tokens),
            "train_tokens": self.train_tokens,
            "val_tokens": len(self.val) if self.val is not None else 0,
            "block_size": self.block_size,
            "vocab_size": getattr(config, "vocab_size", None),
            "vocab_from": self.vocab_from,
            "meta": self.tokens.meta,
        }


def _build(options: TrainOptions) -> _Built:
    """The model, loss and batches of a built-in model or a file.py:factory, on its own data or on --data."""
    if is_factory(options.model):
        from shardfx.tools.model_spec import load_model_spec

        spec = load_model_spec(options.model, options.preset, options.overrides, seed=options.seed)
        if options.data is None:  # a factory has one batch
            return _Built(spec.model, spec.loss_fn, lambda n, generator: spec.batch, spec.kwargs)
        # The factory's batch gives the shapes: batch size (dim 0), block size (dim 1) and dtypes.
        block_size = factory_block_size(options.model, spec.batch)
        size, dtypes = spec.batch[0].shape[0], [x.dtype for x in spec.batch]
        return _on_data(
            options, spec.model, spec.loss_fn, spec.kwargs, block_size, size, dtypes, "model.config.vocab_size"
        )
    kwargs = model_kwargs(options.model, options.preset, options.overrides)
    if options.data is not None:
        vocab_from = "--set vocab_size"
        if "vocab_size" not in kwargs:  # from the data: check_data read it once before the workers started
            tokens = open_tokens(options.data, options.data_dtype)
            kwargs["vocab_size"] = options.data_vocab_size or tokens.vocab_size()
            vocab_from = data_vocab_from(tokens)
        config = gpt_config(kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(options.seed)  # the parameters build_model("gpt") would make
            model = GPT(config)
        return _on_data(options, model, gpt_loss, kwargs, config.seq_len, None, None, vocab_from)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)  # build_model initialises parameters from the global RNG
        model, loss_fn, make_batch = build_model(options.model, **kwargs)
    return _Built(model, loss_fn, make_batch, kwargs)


def _on_data(
    options: TrainOptions,
    model: torch.nn.Module,
    loss_fn: Any,
    kwargs: dict[str, Any],
    block_size: int,
    size: int | None,
    dtypes: list[torch.dtype] | None,
    vocab_from: str,
) -> _Built:
    """Batches of random windows of the --data file's train split; `size` fixes the batch size (a factory's)."""
    tokens = open_tokens(options.data, options.data_dtype)
    train_split, val = tokens.split(options.val_fraction, block_size)

    def cast(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return batch if dtypes is None else tuple(x.to(d) for x, d in zip(batch, dtypes))

    def make_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        return cast(train_split.batch(size or n, block_size, generator))  # (B, T), (B, T)

    return _Built(model, loss_fn, make_batch, kwargs, tokens, len(train_split), val, block_size, cast, vocab_from)


def _show_bar(options: TrainOptions) -> bool:
    """The progress bar only on a terminal: piped or captured output gets the step lines alone, no bar frames."""
    return options.progress and sys.stdout.isatty() and sys.stderr.isatty()


@dataclass
class _LoopResult:
    losses: list[float]
    val_losses: list[list[float]]  # [step, validation loss] pairs
    step_seconds: float  # in train_step
    total_seconds: float  # the loop's wall time
    saved: list[str]  # checkpoints written
    interrupted_at: int | None  # Ctrl-C: the step count when the loop stopped
    trace: dict[str, Any] | None = None  # --trace: where it went and its measured / simulated step


def _loop(
    engine: shardfx.Engine,
    make_batch: Any,
    generator: torch.Generator,
    first: tuple,
    options: TrainOptions,
    peak: PeakMemory,
    evaluate: Any,
    say: Any,
    traced_step: int | None = None,
) -> _LoopResult:
    """Run the steps from engine.steps on; Ctrl-C stops it between steps (all ranks at the same one)
    and, with --save-every, checkpoints there. Step `traced_step` runs as engine.trace_step (--trace)."""
    import torch.distributed as dist

    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    items, unit = items_per_batch(first[0])
    out = _LoopResult([], [], 0.0, 0.0, [], None)
    start = time.perf_counter()
    show_bar = _show_bar(options)
    bar = tqdm(
        range(engine.steps, options.steps),
        initial=engine.steps,
        total=options.steps,
        desc="train",
        unit="step",
        disable=not show_bar,
        dynamic_ncols=True,
        bar_format=BAR_FORMAT,
    )
    with _interrupts(local=options.runtime == "local") as interrupted:
        for step in bar:
            if interrupted(step):
                out.interrupted_at = step
                last = f"step-{step:06d}"
                if options.save_every and out.losses and (not out.saved or out.saved[-1] != last):
                    out.saved.append(_save(engine, options, generator, rank0))
                break
            batch = first if step == 0 else make_batch(options.batch_size, generator)
            peak.reset()
            t0 = time.perf_counter()
            done = step + 1
            traced = None
            if done == traced_step:  # every rank traces it (a collective); rank 0 writes the file
                traced = engine.trace_step(*batch, hardware=options.trace_hardware)
                loss = traced["otherData"]["loss"]
            else:
                loss = engine.train_step(*batch).item()
            dt = time.perf_counter() - t0
            out.step_seconds += dt
            out.losses.append(loss)
            if traced is not None:
                out.trace = _write_trace(traced, options, rank0)
                line = _trace_line(out.trace)
                bar.write(line) if show_bar else say(line)
            val_loss = None
            if evaluate is not None and (done % options.eval_every == 0 or done == options.steps):
                val_loss = evaluate()  # every rank evaluates: eval_step is a collective
                out.val_losses.append([done, val_loss])
            bar.set_postfix_str(f"loss {loss:.3f}", refresh=False)
            if (options.log_every and done % options.log_every == 0) or val_loss is not None:
                line = step_line(engine, done, loss, items / dt, unit, (peak.read(), peak.kind), val_loss)
                bar.write(line) if show_bar else say(line)
            if options.save_every and (done % options.save_every == 0 or done == options.steps):
                out.saved.append(_save(engine, options, generator, rank0))
    bar.close()
    out.total_seconds = time.perf_counter() - start
    return out


def _write_trace(traced: dict[str, Any], options: TrainOptions, rank0: bool) -> dict[str, Any]:
    """Write --trace (on rank 0; every rank holds the whole trace) and say what it holds."""
    assert options.trace_path is not None
    if rank0:
        with open(options.trace_path, "w") as f:
            json.dump(traced, f)
    data = traced["otherData"]
    keys = ("step", "step_ms", "exposed_comm_ms", "optimizer_ms", "simulated_step_ms", "hardware")
    return {"path": options.trace_path, **{k: data.get(k) for k in keys}}


def _trace_line(trace: dict[str, Any]) -> str:
    simulated = (
        f"; simulated {trace['simulated_step_ms']:.1f} ms on {trace['hardware']}"
        if trace["simulated_step_ms"] is not None
        else ""
    )
    return (
        f"trace of step {trace['step']} written to {trace['path']}: measured {trace['step_ms']:.1f} ms "
        f"(exposed communication {trace['exposed_comm_ms']:.1f} ms; optimizer {trace['optimizer_ms']:.1f} ms "
        f"after it){simulated}; open it in ui.perfetto.dev"
    )


@contextmanager
def _interrupts(local: bool) -> Iterator[Callable[[int], bool]]:
    """`interrupted(step)`: True once the user pressed Ctrl-C, checked before each step.

    In a launched worker the launcher holds Ctrl-C and picks the step every rank stops at. On the
    local runtime this process does: the first Ctrl-C stops after the current step, a second one
    raises KeyboardInterrupt at once."""
    from shardfx.runtime.launch import stop_requested

    pressed = threading.Event()
    previous = None
    if local and threading.current_thread() is threading.main_thread():

        def on_sigint(signum: int, frame: Any) -> None:
            pressed.set()
            signal.signal(signal.SIGINT, signal.default_int_handler)

        previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda step: pressed.is_set() or stop_requested(step)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
