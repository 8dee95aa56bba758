"""Compile a model stage by stage: the program after capture and after each pass, for the debugging tools.

`compile_stages(spec, config, world_size)` compiles through the compile driver
(shardfx/driver.py), as compile_distributed does: the same mesh (every axis),
capture and pipeline; the driver's observer keeps a copy of the program after
the capture and after every pass. Stage 0 is "capture"; stage i is the
program after the i-th pass.

`add_compile_arguments` gives the commands their shared flags (world size,
ZeRO stage, precision, clipping, passes to disable or append).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from shardfx.config import Config
from shardfx.driver import CAPTURE, build_mesh, compile_step, passes_for, splits
from shardfx.graphs.analysis import collective_summary, memory_timeline
from shardfx.graphs.pp_schedule import stage_key
from shardfx.graphs.program import DistProgram, clone_program
from shardfx.passes.manager import Pass, PassRecord
from shardfx.passes.pipeline import PASS_NAMES, schedule, step_variants
from shardfx.tools.model_spec import ModelSpec, load_object
from shardfx.tools.options import key_value, positive_float, positive_int


@dataclass
class Stage:
    index: int  # 0: capture; i: after the i-th pass
    name: str  # "capture" or the pass name
    program: DistProgram  # this stage's own copy
    seconds: float  # time the capture or the pass took
    record: PassRecord | None = None  # None for the capture
    disabled: bool = False  # the pass was named by --disable: the program is the previous stage's
    provides: tuple[str, ...] = ()  # the pass's declared facts (passes/facts.py)

    def stats(self) -> dict[str, Any]:
        """Nodes, collectives by kind, bytes per step and estimated per-rank peak memory (graphs.analysis)."""
        summary = collective_summary(self.program)
        return {
            "nodes": len(self.program.graph.nodes),
            "collectives": summary["calls"],
            "comm_bytes": sum(summary["volume"].values()),
            "peak_bytes": memory_timeline(self.program).peak,
        }


def add_compile_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose the pipeline (shared by passes, viz and bisect)."""
    group = parser.add_argument_group("compilation (as shardfx.Config)")
    group.add_argument(
        "--world-size", type=positive_int, default=2, metavar="N", help="number of ranks (default %(default)s)"
    )
    group.add_argument(
        "--zero",
        "--zero-stage",
        dest="zero_stage",
        type=int,
        choices=(0, 1, 2, 3),
        default=0,
        help="ZeRO stage: 0 data parallel, 1 shard optimizer states, 2 + gradients, 3 + parameters (default 0)",
    )
    group.add_argument(
        "--reshard",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ZeRO-3: free gathered parameters after the forward and gather them again for the backward "
        "(default); --no-reshard keeps them from forward to backward",
    )
    group.add_argument("--bf16", action="store_true", help="bf16 mixed precision (fp32 master shards)")
    group.add_argument(
        "--reduce-dtype", choices=("fp32", "bf16"), default="fp32", help="with --bf16: dtype gradients are reduced in"
    )
    group.add_argument("--grad-clip", type=positive_float, metavar="X", help="clip gradients to this global norm")
    group.add_argument(
        "--batchnorm",
        choices=("global", "local"),
        default="global",
        help="global: batch statistics over the global batch; local: each rank's own (DDP) (default global)",
    )
    group.add_argument(
        "--config",
        dest="config_items",
        metavar="KEY=VALUE",
        type=key_value,
        action="append",
        default=[],
        help=f"set any other Config field, e.g. --config bucket_mb=25 (repeatable; keys: {', '.join(Config.keys())})",
    )
    group.add_argument(
        "--disable", metavar="PASS", action="append", default=[], help="skip this pass of the pipeline (repeatable)"
    )
    group.add_argument(
        "--force-disable",
        action="store_true",
        help="let --disable skip a pass the program needs to be correct (data_parallel, a ZeRO pass, grad_norm, "
        "clip_gradients, sum_gradients): the program is then not the configured step",
    )
    group.add_argument(
        "--append-pass",
        metavar="MODULE:FUNCTION",
        action="append",
        default=[],
        help="append a pass after the pipeline: a function (program, ctx) -> PassResult or a Pass, "
        "as path/to/file.py:NAME or package.module:NAME (repeatable)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_variant_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--variant",
        choices=("first", "middle", "last", "step"),
        help="with --config grad_accum_steps=K: which program of an optimizer step to compile: first "
        "(ZeRO-1/2 gather the parameters), middle (gradients kept in accumulators), last (the one that "
        "reduces them); default: last",
    )
    parser.add_argument(
        "--pp-stage",
        type=int,
        metavar="S",
        help="with --config pp_size=P: which pipeline stage's program to compile, 0 .. P-1 (default: the last)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    values: dict[str, Any] = dict(
        zero_stage=args.zero_stage,
        reshard_after_forward=args.reshard,
        mixed_precision="bf16" if args.bf16 else None,
        reduce_dtype=args.reduce_dtype,
        grad_clip=args.grad_clip,
        batchnorm=args.batchnorm,
        disable_passes=tuple(args.disable),
        force_disable=args.force_disable,
    )
    values.update(dict(args.config_items))
    return Config.from_dict(values)


def extra_passes_from_args(args: argparse.Namespace) -> list[Pass]:
    return [as_pass(load_object(text), text) for text in args.append_pass]


def as_pass(obj: Any, text: str = "") -> Pass:
    """A Pass, or a pass function wrapped in one (named after the function)."""
    if isinstance(obj, Pass):
        return obj
    if not callable(obj):
        raise TypeError(f"{text or obj!r} must be a pass function (program, ctx) -> PassResult or a Pass")
    name = getattr(obj, "__name__", None) or text.rpartition(":")[2]
    return Pass(name, obj, f"appended with --append-pass {text}".rstrip())


def pass_list(
    config: Config, world_size: int, extra_passes: list[Pass] = (), variant: str | None = None, stage: int | None = None
) -> list[Pass]:
    """The pipeline of one program of the step: under accumulation `variant` (None: the last) of
    step_variants; under pipeline parallelism, of stage `stage` (None: the last)."""
    variants = step_variants(config)
    if variant is not None and variant not in variants:
        if len(variants) == 1:
            raise ValueError(
                "--variant picks one program of an accumulating step; give --config grad_accum_steps=K "
                "(or pp_microbatches=M with pp_size=P)"
            )
        raise ValueError(f"--variant {variant}: this configuration compiles {', '.join(variants)}")
    return passes_for(config, build_mesh(config, world_size), program_name(config, variant, stage), extra_passes)


def program_name(config: Config, variant: str | None, stage: int | None) -> str:
    """The compile driver's name of one program: a variant, or "stage{s}/{variant}" in a pipeline."""
    variant = variant or schedule(config).micro_batches[-1]
    if config.pp_size == 1:
        if stage is not None:
            raise ValueError("--pp-stage picks a pipeline stage's program; give --config pp_size=P")
        return variant
    n = config.pp_stages
    stage = n - 1 if stage is None else stage
    if not 0 <= stage < n:
        raise ValueError(f"--pp-stage {stage}: a pipeline of {n} stages has stages 0 .. {n - 1}")
    return stage_key(stage, variant)


def check_pass_name(name: str, passes: list[Pass], option: str, capture_ok: bool = False) -> None:
    allowed = ([CAPTURE] if capture_ok else []) + [p.name for p in passes]
    if name not in allowed:
        raise ValueError(f"{option} {name}: no such pass in this pipeline; allowed: {', '.join(allowed)}")


def compile_stages(
    spec: ModelSpec,
    config: Config,
    world_size: int,
    *,
    extra_passes: list[Pass] = (),
    stop_after: str | None = None,
    progress: bool = False,
    variant: str | None = None,
    stage: int | None = None,
) -> list[Stage]:
    """The program after capture and after every pass (up to `stop_after`), each its own copy;
    under accumulation, of the step's program `variant` (see pass_list). One run of the compile
    driver: its observer copies the program after each stage."""
    mesh = build_mesh(config, world_size)
    passes = pass_list(config, world_size, extra_passes, variant, stage)
    variant = program_name(config, variant, stage)
    for name in config.disable_passes:  # a pass of any pipeline (e.g. accumulate_gradients) may be disabled
        if name not in PASS_NAMES:
            check_pass_name(name, passes, "--disable")
    if stop_after is not None:
        check_pass_name(stop_after, passes, "--stop-after", capture_ok=True)
        passes = passes[: [CAPTURE, *(p.name for p in passes)].index(stop_after)]
    n = splits(mesh, config)
    for i, x in enumerate(spec.batch):
        if x.dim() == 0 or x.shape[0] % n:
            into = (
                f"{n} ranks"
                if n == mesh.size("dp")
                else f"{mesh.size('dp')} ranks x {n // mesh.size('dp')} micro-batches"
            )
            raise ValueError(f"example batch[{i}] has shape {list(x.shape)}: its dim 0 must divide into {into}")
    bar = tqdm(total=len(passes) + 1, desc=CAPTURE, unit="stage", disable=True if not progress else None, leave=False)
    stages: list[Stage] = []

    def observe(_variant: str, index: int, p: Pass | None, program: DistProgram, record: PassRecord | None) -> None:
        if p is None:
            stages.append(Stage(0, CAPTURE, clone_program(program), 0.0))
        else:
            assert record is not None
            stages.append(
                Stage(index, p.name, clone_program(program), record.seconds, record, record.skipped, p.provides)
            )
        bar.set_description(passes[index].name if index < len(passes) else "done")
        bar.update()

    compiled = compile_step(
        spec.model,
        spec.batch,
        spec.loss_fn,
        config,
        mesh,
        variants=[variant],
        extra_passes=extra_passes,
        stop_after=stop_after,
        observer=observe,
    )
    bar.close()
    stages[0].seconds = compiled.capture_seconds
    return stages


def find_stage(stages: list[Stage], name: str, option: str) -> Stage:
    """A stage by name ("capture" or a pass) or number."""
    for stage in stages:
        if stage.name == name or str(stage.index) == name:
            return stage
    allowed = ", ".join(s.name for s in stages)
    raise ValueError(f"{option} {name}: no such stage (compiled: {allowed})")
