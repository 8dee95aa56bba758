"""`shardfx train`: train a built-in model with shardfx.compile_distributed.

The default trains a small GPT on the synthetic Markov token stream
(shardfx.models.MarkovTokens) on 4 ranks, each its own process, started by shardfx's launcher
(shardfx.runtime.launch; gloo on CPU); rank 0 prints the progress.
Ctrl-C stops after the current step (every rank at the same one), saves a
checkpoint when --save-every is set, and exits 130; a second Ctrl-C stops at once.
`--runtime local` runs the ranks as threads of this process instead. The chain's
entropy rate is the lowest loss any model can reach, so the loss should fall
from about log(vocab) toward that floor, never below it.

    shardfx train                                   # GPT "small", 4 ranks, ZeRO stage 0
    shardfx train --world-size 2 --steps 100 --zero-stage 1 --json run.json
    shardfx train --preset tiny --set n_layer=4 --dump-dir dumps/
    shardfx train --save-every 50 --checkpoint-dir ckpt/     # then, after a crash: --resume
    shardfx train --config ds_config.json                    # ZeRO stage, batch sizes, clipping from DeepSpeed's JSON
    shardfx train --model my_model.py:make --steps 20        # a factory returning (model, batch[, loss_fn])
    shardfx prepare-data data/pydoc.bin && shardfx train --data data/pydoc.bin --eval-every 20   # real text
    shardfx train --world-size 2 --preset tiny --zero-stage 3 --steps 5 --trace step.json   # measured vs simulated

--data PATH trains on a token file (nanoGPT's flat uint16/uint32 .bin, or a .npy;
shardfx.models.tokens): random windows of block_size + 1 tokens drawn with the
run's generator, the last --val-fraction held out; --eval-every N reports the
mean loss over --eval-batches fixed held-out batches (engine.eval_step). The
built-in gpt takes its vocab_size from the data; a factory's batch gives the
batch and block size (its dim 0 and 1) and its loss_fn.

A line per --log-every steps (loss, throughput, planned or measured peak memory a
rank, communicated bytes, learning rate) prints under the progress bar, which is
shown only when stdout and stderr are terminals. Checkpoints go to CHECKPOINT_DIR/step-NNNNNN with
CHECKPOINT_DIR/latest naming the newest; --resume continues from it (same data stream).

--trace FILE.json measures one optimizer step (--trace-step, default the second this run trains):
every rank runs that step's program node by node, timing each node (the same ops, so the same
results; engine.trace_step, runtime/step_trace.py), and rank 0 writes every rank's compute,
communication and optimizer tracks as a Chrome / Perfetto trace, with the cost model's simulated
step of the same program beside each rank; `shardfx viz --measured-trace FILE.json` links it.

`train(TrainOptions(...))` runs the same thing in-process and returns the summary.

This file holds the options and the launch; tools/train_loop.py one rank's
training (compile, loop, checkpoints), tools/train_report.py what it prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from shardfx.deepspeed import read_json
from shardfx.graphs.cost_model import hardware
from shardfx.tools.options import (
    add_model_arguments,
    model_kwargs,
    non_negative_int,
    positive_float,
    positive_int,
    unwritable,
)
from shardfx.tools.train_loop import latest_checkpoint, train_here
from shardfx.tools.train_options import (
    DEFAULT_BATCH_SIZE,
    TrainOptions,
    batch_size_for,
    check_data,
    implied_batch_size,
    is_factory,
    trace_at,
    train_config,
)

NAME = "train"
EXIT_INTERRUPTED = 130  # as a shell reports a command stopped by Ctrl-C (128 + SIGINT)
HELP = "train a built-in model (default: a small GPT on Markov tokens) on N ranks"


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
        "--lr",
        type=positive_float,
        default=None,
        help=f"AdamW learning rate (default {defaults.lr}); with --config, the file's optimizer and lr are used "
        'and --lr fills its "auto" values',
    )
    parser.add_argument(
        "--zero-stage",
        type=int,
        choices=(0, 1, 2, 3),
        default=defaults.zero_stage,
        help="ZeRO stage: 0 data parallel, 1 shard optimizer states, 2 + gradients, 3 + parameters "
        "(passed to shardfx.Config; default: the --config file's, else 0)",
    )
    pipeline = parser.add_argument_group("pipeline parallelism")
    pipeline.add_argument(
        "--pp-size",
        type=positive_int,
        metavar="P",
        help="pipeline stages; --world-size must divide by P (the rest splits the batch) (default: 1)",
    )
    pipeline.add_argument(
        "--pp-microbatches",
        type=positive_int,
        metavar="M",
        help="micro-batches each step's batch is cut into for the pipeline (default: 2 x --pp-size)",
    )
    pipeline.add_argument(
        "--pp-schedule",
        choices=("gpipe", "1f1b"),
        help="gpipe: all forwards, then all backwards; 1f1b: one of each in the steady state, at most P "
        "micro-batches alive (default 1f1b)",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        metavar="PATH",
        help="train on a token file instead of the synthetic data: a raw little-endian uint16/uint32 array "
        "(nanoGPT's train.bin; `shardfx prepare-data` writes one) or a 1-D .npy",
    )
    data.add_argument(
        "--data-dtype",
        choices=("uint16", "uint32"),
        help="the ids' type in a raw --data file (default: its PATH.meta.json's, else uint16)",
    )
    data.add_argument(
        "--val-fraction",
        type=_fraction,
        default=defaults.val_fraction,
        metavar="F",
        help="the last fraction of --data held out for validation, in [0, 1) (default %(default)s)",
    )
    data.add_argument(
        "--eval-every",
        type=non_negative_int,
        default=defaults.eval_every,
        metavar="N",
        help="validation loss every N steps and at the end (needs --data); 0: never (default %(default)s)",
    )
    data.add_argument(
        "--eval-batches",
        type=positive_int,
        default=defaults.eval_batches,
        metavar="N",
        help="fixed held-out batches the validation loss is the mean over (default %(default)s)",
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
        help="process: one process per rank over torch.distributed (gloo/NCCL), started by shardfx's "
        "launcher (everything listens on 127.0.0.1); local: ranks are threads of this process (default %(default)s)",
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
        help="a DeepSpeed JSON config: optimizer, scheduler (DeepSpeed's LR curves), fp16 with loss scaling, bf16, "
        "zero_optimization, batch sizes, gradient_accumulation_steps, gradient_clipping, activation_checkpointing, "
        "steps_per_print (docs/deepspeed.md); keys shardfx cannot honour are listed with the reason and ignored",
    )
    parser.add_argument(
        "--strict-config",
        action="store_true",
        help="make any --config key shardfx cannot honour an error instead of a header line",
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
        default=None,
        metavar="N",
        help="print a step line (loss, throughput, memory, communication) every N steps; 0: none "
        f"(default: the --config file's steps_per_print, else {defaults.log_every})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (header and summary only)")
    trace = parser.add_argument_group("measured step trace")
    trace.add_argument(
        "--trace",
        dest="trace_path",
        metavar="FILE.json",
        help="write one measured optimizer step (--trace-step) as a Chrome/Perfetto trace (ui.perfetto.dev): per "
        "rank a compute, a communication and an optimizer track, exposed communication marked, and beside each "
        "rank the cost model's simulated step of the same program; that step runs node by node (the same results, "
        "its step line slower); pipelines (--pp-size > 1) are not supported and refused",
    )
    trace.add_argument(
        "--trace-step",
        type=positive_int,
        metavar="N",
        help="the optimizer step --trace measures, numbered as the step lines (default: the second step this run "
        "trains, so the first one's warm-up is not in it)",
    )
    trace.add_argument(
        "--trace-hardware",
        default=defaults.trace_hardware,
        metavar="PROFILE",
        help="the cost model's profile for the simulated step in --trace (default: this machine's; "
        "cpu, a100, h100, h200, h100-ib)",
    )
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
        lr=args.lr if args.lr is not None else TrainOptions.lr,
        lr_given=args.lr is not None,
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
        strict_config=args.strict_config,
        log_every=args.log_every if args.log_every is not None else _steps_per_print(args.ds_config),
        pp_size=args.pp_size,
        pp_microbatches=args.pp_microbatches,
        pp_schedule=args.pp_schedule,
        data=args.data,
        data_dtype=args.data_dtype,
        val_fraction=args.val_fraction,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        trace_path=args.trace_path,
        trace_step=args.trace_step,
        trace_hardware=args.trace_hardware,
    )
    summary = train(options, echo=print)
    if summary.get("interrupted_at") is not None:
        saved = summary["checkpoints"]
        where = f"; checkpoint {os.path.join(options.checkpoint_dir, saved[-1])}" if saved else ""
        print(f"shardfx train: interrupted at step {summary['interrupted_at']}{where}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _steps_per_print(ds_config: str | None) -> int:
    """--log-every's default: the DeepSpeed file's steps_per_print, else TrainOptions' (from_config checks the value)."""
    if ds_config is not None:
        value = read_json(ds_config)[0].get("steps_per_print")
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return TrainOptions.log_every


def train(options: TrainOptions, echo: Any = None) -> dict[str, Any]:
    """Compile and train as `shardfx train` does; returns rank 0's summary (per-step losses under "losses").

    `echo(line)` receives the header and summary lines (None: silent).
    """
    config = train_config(options)
    options = dataclasses.replace(options, batch_size=batch_size_for(options, config))
    accum = config.grad_accum_steps
    if not is_factory(options.model) and config.micro_batch_size is not None:
        implied, how = implied_batch_size(config, options.world_size)
        if options.batch_size != implied:
            raise ValueError(f"--batch-size {options.batch_size} disagrees with --config: {how} is {implied}")
    if not is_factory(options.model) and options.batch_size % (options.world_size * accum) != 0:
        raise ValueError(
            f"--batch-size {options.batch_size} does not divide into --world-size {options.world_size} ranks; "
            f"use a multiple of {options.world_size}"
        )
    # Config, the model options and the data are checked here, before any worker starts.
    if not is_factory(options.model):
        model_kwargs(options.model, options.preset, options.overrides)
    if options.data is not None:
        options = check_data(options)  # the gpt's vocab_size from the data
    elif options.eval_every:
        raise ValueError("--eval-every needs --data: the synthetic data has no held-out split")
    if options.resume:
        latest_checkpoint(options.checkpoint_dir)
    check_trace(options, config.pp_size)
    check_paths(options)
    if options.runtime == "local":
        return train_here(options, echo)
    from shardfx.runtime.launch import launch

    if echo is not None:
        echo(f"starting {options.world_size} worker processes (shardfx launcher, listening on 127.0.0.1 only) ...")
    results = launch(_train_worker, (options, echo is not None), options.world_size, timeout=options.timeout)
    return results[0]


def check_trace(options: TrainOptions, pp_size: int) -> None:
    """--trace, --trace-step and --trace-hardware, checked before any worker starts."""
    if options.trace_path is None:
        if options.trace_step is not None:
            raise ValueError(
                f"--trace-step {options.trace_step} says which step --trace measures; give --trace FILE.json"
            )
        return
    if Path(options.trace_path).suffix.lower() != ".json":
        raise ValueError(f"--trace {options.trace_path}: the file name must end in .json")
    if pp_size > 1:
        raise ValueError(
            f"--trace times one program per rank; a pipeline (--pp-size {pp_size}) interleaves several stages' "
            "programs on each rank: not supported, trace a run with --pp-size 1"
        )
    if not options.resume:  # resumed, the start step is the checkpoint's: checked once it is loaded
        trace_at(options, 0)
    hardware(options.trace_hardware)  # an unknown profile names the known ones


def check_paths(options: TrainOptions) -> None:
    """Every path the run writes, checked before any worker starts: a ValueError naming the option."""
    targets = [
        ("--dump-dir", options.dump_dir, True),
        ("--json", options.json_path, False),
        ("--trace", options.trace_path, False),
    ]
    if options.save_every:
        targets.append(("--checkpoint-dir", options.checkpoint_dir, True))
    for flag, path, is_dir in targets:
        if path:
            problem = unwritable(path, is_dir)
            if problem:
                raise ValueError(f"{flag} {path}: {problem}; choose a path you can write")


def _fraction(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1); got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1); got {text!r}")
    return value


def _train_worker(options: TrainOptions, verbose: bool) -> dict[str, Any]:
    """One rank of a multi-process run: rank 0 prints and shows the progress bar."""
    import torch.distributed as dist

    rank0 = dist.get_rank() == 0
    options = dataclasses.replace(
        options, progress=options.progress and rank0, json_path=options.json_path if rank0 else None
    )
    return train_here(options, print if verbose and rank0 else None)
