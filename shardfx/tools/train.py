"""`shardfx train`: train a built-in model with shardfx.compile_distributed.

The default trains a small GPT on the synthetic Markov token stream
(shardfx.models.MarkovTokens) on 4 ranks, each its own process, started through
torch's elastic launcher (gloo on CPU); rank 0 prints the progress.
`--runtime local` runs the ranks as threads of this process instead. The chain's
entropy rate is the lowest loss any model can reach, so the loss should fall
from about log(vocab) toward that floor, never below it.

    shardfx train                                   # GPT "small", 4 ranks, ZeRO stage 0
    shardfx train --world-size 2 --steps 100 --zero-stage 1 --json run.json
    shardfx train --preset tiny --set n_layer=4 --dump-dir dumps/
    shardfx train --save-every 50 --checkpoint-dir ckpt/     # then, after a crash: --resume
    shardfx train --config ds_config.json                    # ZeRO stage, batch sizes, clipping from DeepSpeed's JSON
    shardfx train --model my_model.py:make --steps 20        # a factory returning (model, batch[, loss_fn])

A line per --log-every steps (loss, throughput, per-rank memory, communicated bytes)
prints under the progress bar. Checkpoints go to CHECKPOINT_DIR/step-NNNNNN with
CHECKPOINT_DIR/latest naming the newest; --resume continues from it (same data stream).

`train(TrainOptions(...))` runs the same thing in-process and returns the summary.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

import shardfx
from shardfx.models import MarkovTokens, build_model, num_params
from shardfx.tools.options import (
    DEFAULT_PRESET,
    add_model_arguments,
    model_kwargs,
    non_negative_int,
    positive_float,
    positive_int,
)

NAME = "train"
HELP = "train a built-in model (default: a small GPT on Markov tokens) on N ranks"

LAST_WINDOW = 10  # the summary's last loss is the mean of this many final steps


DEFAULT_BATCH_SIZE = 32  # sequences a step when neither --batch-size nor --config says


@dataclass
class TrainOptions:
    """What `shardfx train` runs; the defaults are the command's defaults (about a minute on 2 CPU cores)."""

    world_size: int = 4
    model: str = "gpt"
    preset: str | None = None  # None: the model's default preset ("small" for gpt)
    overrides: dict[str, Any] = field(default_factory=dict)
    steps: int = 200
    batch_size: int | None = None  # global, split over the ranks; None: from the --config file, else 32
    lr: float = 3e-3
    zero_stage: int | None = None  # None: the --config file's stage, else 0
    seed: int = 0
    dump_dir: str | None = None
    progress: bool = True
    json_path: str | None = None
    runtime: str = "process"  # "process": one process per rank (torch.distributed); "local": threads
    timeout: float = 60.0  # seconds a rank may wait in a collective before the job fails
    save_every: int = 0  # write a checkpoint every N steps (and at the end); 0: never
    checkpoint_dir: str = "checkpoints"
    resume: bool = False  # continue from checkpoint_dir/latest
    ds_config: str | None = None  # a DeepSpeed JSON config
    log_every: int = 10  # a step line every N steps under the progress bar; 0: none


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    defaults = TrainOptions()
    parser = subparsers.add_parser(
        NAME, help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--world-size",
        type=positive_int,
        metavar="N",
        default=defaults.world_size,
        help="number of ranks (default %(default)s)",
    )
    add_model_arguments(parser, model_default=defaults.model)
    parser.add_argument(
        "--steps", type=positive_int, metavar="N", default=defaults.steps, help="optimizer steps (default %(default)s)"
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="global batch size in sequences, all micro-batches of a step; must divide by --world-size "
        f"(default: the --config file's train_batch_size, or its micro-batch size x accumulation x world size, "
        f"else {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--lr", type=positive_float, default=defaults.lr, help="AdamW learning rate (default %(default)s)"
    )
    parser.add_argument(
        "--zero-stage",
        type=int,
        choices=(0, 1, 2, 3),
        default=defaults.zero_stage,
        help="ZeRO stage: 0 data parallel, 1 shard optimizer states, 2 + gradients, 3 + parameters "
        "(passed to shardfx.Config; default: the --config file's, else 0)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seeds the parameters and the batch stream (default %(default)s)",
    )
    parser.add_argument(
        "--runtime",
        choices=("process", "local"),
        default=defaults.runtime,
        help="process: one process per rank over torch.distributed (gloo/NCCL), started by torch's elastic "
        "launcher; local: ranks are threads of this process (default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=defaults.timeout,
        help="seconds a rank waits in a collective before every rank fails (default %(default)s)",
    )
    parser.add_argument("--dump-dir", help="write the printed program after every pass into this folder")
    parser.add_argument(
        "--config",
        dest="ds_config",
        metavar="DS_CONFIG.json",
        help="a DeepSpeed JSON config (zero_optimization.stage, batch sizes, gradient_accumulation_steps, "
        "gradient_clipping, bf16, buckets, overlap); unsupported keys are named and ignored",
    )
    parser.add_argument(
        "--save-every", type=non_negative_int, default=0, metavar="N", help="checkpoint every N steps and at the end"
    )
    parser.add_argument(
        "--checkpoint-dir", default=defaults.checkpoint_dir, help="where checkpoints go (default %(default)s)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")
    parser.add_argument(
        "--log-every",
        type=non_negative_int,
        default=defaults.log_every,
        metavar="N",
        help="print a step line (loss, throughput, memory, communication) every N steps; 0: none (default %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (header and summary only)")
    parser.add_argument(
        "--json", dest="json_path", metavar="PATH", help="write the summary and per-step losses as JSON"
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    options = TrainOptions(
        world_size=args.world_size,
        model=args.model,
        preset=args.preset,
        overrides=dict(args.overrides),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        zero_stage=args.zero_stage,
        seed=args.seed,
        dump_dir=args.dump_dir,
        progress=not args.no_progress,
        json_path=args.json_path,
        runtime=args.runtime,
        timeout=args.timeout,
        save_every=args.save_every,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        ds_config=args.ds_config,
        log_every=args.log_every,
    )
    train(options, echo=print)
    return 0


def train(options: TrainOptions, echo: Any = None) -> dict[str, Any]:
    """Compile and train as `shardfx train` does; returns rank 0's summary (per-step losses under "losses").

    `echo(line)` receives the header and summary lines (None: silent).
    """
    config = _config(options)
    options = dataclasses.replace(options, batch_size=_batch_size(options, config))
    accum = config.grad_accum_steps
    if not _is_factory(options.model) and config.micro_batch_size is not None:
        implied = config.micro_batch_size * accum * options.world_size
        if options.batch_size != implied:
            raise ValueError(
                f"--batch-size {options.batch_size} disagrees with --config: train_micro_batch_size_per_gpu "
                f"{config.micro_batch_size} x gradient_accumulation_steps {accum} x world size "
                f"{options.world_size} is {implied}"
            )
    if not _is_factory(options.model) and options.batch_size % (options.world_size * accum) != 0:
        raise ValueError(
            f"--batch-size {options.batch_size} does not divide into --world-size {options.world_size} ranks; "
            f"use a multiple of {options.world_size}"
        )
    # Config and the model options are checked here, before any worker starts.
    if not _is_factory(options.model):
        model_kwargs(options.model, options.preset, options.overrides)
    if options.resume:
        latest_checkpoint(options.checkpoint_dir)
    if options.runtime == "local":
        return _train_here(options, echo)
    from shardfx.runtime.launch import launch

    if echo is not None:
        echo(f"starting {options.world_size} worker processes (torch elastic launcher, rendezvous on 127.0.0.1) ...")
    results = launch(_train_worker, (options, echo is not None), options.world_size, timeout=options.timeout)
    return results[0]


def _train_worker(options: TrainOptions, verbose: bool) -> dict[str, Any]:
    """One rank of a multi-process run: rank 0 prints and shows the progress bar."""
    import torch.distributed as dist

    rank0 = dist.get_rank() == 0
    options = dataclasses.replace(
        options, progress=options.progress and rank0, json_path=options.json_path if rank0 else None
    )
    return _train_here(options, print if verbose and rank0 else None)


def _config(options: TrainOptions) -> shardfx.Config:
    """--config's DeepSpeed file (if any), then the command's own options on top."""
    changes: dict[str, Any] = {"dump_dir": options.dump_dir, "collective_timeout": options.timeout}
    if options.zero_stage is not None:
        changes["zero_stage"] = options.zero_stage
    if options.ds_config is None:
        return shardfx.Config().replace(**changes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # named in the header instead
        base = shardfx.Config.from_deepspeed(options.ds_config, world_size=options.world_size)
    config = base.replace(**changes)
    object.__setattr__(config, "deepspeed_unsupported", base.deepspeed_unsupported)
    return config


def _batch_size(options: TrainOptions, config: shardfx.Config) -> int:
    """--batch-size, else what the --config file implies, else DEFAULT_BATCH_SIZE."""
    if options.batch_size is not None:
        return options.batch_size
    if config.train_batch_size is not None:
        return config.train_batch_size
    if config.micro_batch_size is not None:
        return config.micro_batch_size * config.grad_accum_steps * options.world_size
    return DEFAULT_BATCH_SIZE


def _is_factory(model: str) -> bool:
    return ":" in model


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


def _train_here(options: TrainOptions, echo: Any) -> dict[str, Any]:
    """Train with the runtime of this process: threads (local), or this rank of a launched job."""
    say = echo or (lambda line: None)
    config = _config(options)
    model, loss_fn, make_batch, kwargs = _build(options)
    floor, uniform = (None, None) if _is_factory(options.model) else _loss_floor(options.model, model, kwargs)
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
        "model_config": _model_config(model),
        "params": num_params(model),
        "world_size": options.world_size,
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
    say(_header(summary))
    try:
        losses, step_seconds, total_seconds, saved = _loop(engine, make_batch, generator, example, options, floor, say)
    finally:
        close = getattr(engine.runtime, "close", None)
        if close is not None:
            close()
    items, unit = _items_per_batch(example[0])
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
    say(_footer(summary))
    if options.json_path:
        with open(options.json_path, "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
        say(f"summary written to {options.json_path}")
    return summary


def _build(options: TrainOptions) -> tuple[torch.nn.Module, Any, Any, dict[str, Any]]:
    """(model, loss_fn, make_batch(n, generator), builder kwargs) of a built-in model or a file.py:factory."""
    if _is_factory(options.model):
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
    items, unit = _items_per_batch(first[0])
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
            line = _step_line(engine, step + 1, loss, items / dt, unit)
            bar.write(line) if options.progress else say(line)
        if options.save_every and ((step + 1) % options.save_every == 0 or step + 1 == options.steps):
            saved.append(_save(engine, options, generator, rank0))
    bar.close()
    return losses, step_seconds, time.perf_counter() - start, saved


def _step_line(engine: shardfx.Engine, step: int, loss: float, rate: float, unit: str) -> str:
    stats = engine.stats()
    memory = sum(stats["memory"].values())
    sent = sum(stats["comm"]["sent"].values())
    norm = stats["grad_norm"]
    parts = [
        f"step {step:>6}",
        f"loss {loss:.4f}",
        f"{rate:,.0f} {unit}",
        f"mem/rank {memory / 2**20:.2f} MiB",
        f"accumulators/rank {stats['grad_accum_bytes'] / 2**20:.2f} MiB" if stats["grad_accum_bytes"] else "",
        f"sent/rank {sent / 2**20:.2f} MiB",
        f"grad norm {norm:.3g}" if norm is not None else "",
        f"lr {stats['lr'][0]:.3g}" if stats["lr"] else "",
    ]
    return "  ".join(p for p in parts if p)


def _loss_floor(name: str, model: torch.nn.Module, kwargs: dict[str, Any]) -> tuple[float | None, float | None]:
    """(lowest reachable loss, loss of a uniform guess) for the built-in data, None where unknown."""
    if name == "gpt":
        vocab = model.config.vocab_size
        # The registry builds the same chain from (vocab_size, data_seed) but does not hand it out.
        data = MarkovTokens(vocab_size=vocab, seed=kwargs.get("data_seed", 0))
        return data.entropy_rate(), math.log(vocab)
    if name == "mlp":
        return 0.0, None  # a deterministic teacher: MSE can reach zero
    return None, None


def _model_config(model: torch.nn.Module) -> dict[str, Any] | None:
    """The model's config dataclass as a dict (GPT has one), for the header and the JSON summary."""
    config = getattr(model, "config", None)
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) and not isinstance(config, type) else None


def _items_per_batch(inputs: torch.Tensor) -> tuple[int, str]:
    """Tokens in a batch of token ids (B, T); otherwise samples (dim 0)."""
    if inputs.dtype in (torch.int32, torch.int64):
        return inputs.numel(), "tok/s"
    return inputs.shape[0], "samples/s"


def _header(s: dict[str, Any]) -> str:
    name = s["model"] if s["preset"] is None else f"{s['model']} {s['preset']}"
    sizes = " ".join(f"{k}={v}" for k, v in (s["model_config"] or s["model_args"]).items() if k != "preset")
    name = f"{name} ({sizes})" if sizes else name
    return "\n".join(
        [
            f"model       {name}: {s['params']:,} parameters",
            f"ranks       world size {s['world_size']} ({s['runtime']} runtime), ZeRO stage {s['zero_stage']}, passes: {', '.join(s['passes'])}",
            f"compiled    in {s['compile_seconds']:.1f} s, {s['graph_nodes']} graph nodes",
            f"training    {s['steps']} steps, global batch {s['batch_size']}"
            + (f" ({s['grad_accum_steps']} micro-batches a step)" if s["grad_accum_steps"] > 1 else "")
            + f", AdamW lr {s['lr']}, seed {s['seed']}",
        ]
        + ([f"resumed     from {s['resumed_from']} at step {s['start_step']}"] if s["resumed_from"] else [])
        + ([f"ds config   ignored keys: {', '.join(s['deepspeed_unsupported'])}"] if s["deepspeed_unsupported"] else [])
    )


def _footer(s: dict[str, Any]) -> str:
    floor = "n/a" if s["floor"] is None else f"{s['floor']:.4f}"
    lines = [
        f"loss        first {s['first_loss']:.4f}, last {s['last_loss']:.4f} (mean of last {s['last_window']} steps), "
        f"floor {floor}" + ("" if s["uniform_loss"] is None else f", uniform guess {s['uniform_loss']:.4f}"),
        f"time        {s['total_seconds']:.1f} s total ({s['compile_seconds']:.1f} s compile), "
        f"{s['throughput']:,.0f} {s['throughput_unit']} in train_step",
        f"state       {sum(s['memory_per_rank'].values()) / 2**20:.2f} MiB a rank "
        f"({', '.join(f'{k} {v / 2**20:.2f}' for k, v in s['memory_per_rank'].items())}), "
        f"{s['skipped_steps']} non-finite steps skipped",
    ]
    if s["checkpoints"]:
        lines.append(f"checkpoints {len(s['checkpoints'])} written, latest {s['checkpoints'][-1]}")
    return "\n".join(lines)
