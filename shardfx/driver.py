"""The compile driver: the one way a model, an example batch and a Config become programs.

Every caller compiles through it (compile_distributed, every `shardfx`
subcommand, the benchmarks, the test helpers), so a Config means the same
thing everywhere:

    mesh = build_mesh(config, world_size)          # every axis (pp x dp x tp), built once
    compiled = compile_step(model, batch, loss_fn, config, mesh)
    compiled.programs["step"]                      # or "first" / "middle" / "last" under accumulation
    compiled.schedule                              # which program runs at which micro-batch
    compiled.records["step"]                       # one PassRecord per pass (time, nodes, collectives)

Under pipeline parallelism (Config.pp_size > 1) every stage has its own programs,
keyed "stage{s}/{variant}" (stage_key), the capture is at one micro-batch of one
rank, and `compiled.pipeline` holds the schedule table; before it returns,
the driver proves that every rank's sends, receives and collectives over the
whole table match its peers' (graphs/pp_schedule.check).

`compile_step` captures the step once at one rank's batch shape
(`capture_step`), checks the pipeline's contracts (passes/manager.py), then
runs the pipeline for every program the step needs (passes/pipeline.py:
schedule) on copies of the capture (`compile_traced`: one capture can be
compiled under many Configs). An `observer` sees the
program after the capture and after every pass, for tools that show stages.
`compile_eval` does the same for eval_step's forward-only program.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from shardfx.config import Config
from shardfx.graphs import pp_schedule
from shardfx.graphs.capture import capture
from shardfx.graphs.capture_forward import capture_forward
from shardfx.graphs.phases import split_phases
from shardfx.graphs.pp_schedule import stage_key
from shardfx.graphs.program import PHASES, PIPELINE, DistProgram, Mesh, Schedule, clone_program
from shardfx.passes.manager import Pass, PassContext, PassRecord, check_pipeline, run_passes
from shardfx.passes.pipeline import PASS_NAMES, compute_dtype, pipeline, schedule, step_variants

CAPTURE = "capture"

# observer(variant, index, pass, program, record): index 0 is the capture (pass and record None).
# The program is the one being rewritten: copy it (clone_program) to keep it.
Observer = Callable[[str, int, Pass | None, DistProgram, PassRecord | None], None]


@dataclass
class Traced:
    """The captured step (before any pass) and how long the capture took."""

    program: DistProgram
    seconds: float


@dataclass
class Compiled:
    """What compile_step returns: the programs of one batch shape and how to run them."""

    mesh: Mesh
    programs: dict[str, DistProgram]  # by variant, in step_variants order
    records: dict[str, list[PassRecord]]
    passes: dict[str, list[Pass]]
    schedule: Schedule
    capture_seconds: float
    pipeline: pp_schedule.PipelineSchedule | None = None

    @property
    def last(self) -> str:
        """The variant of an optimizer step's last micro-batch (the one a plain step runs); under
        pipeline parallelism the last stage's."""
        if self.pipeline is not None:
            return stage_key(self.pipeline.stages - 1, self.schedule.micro_batches[-1])  # the model's last stage
        return self.schedule.micro_batches[-1]

    @property
    def program(self) -> DistProgram:
        """The program of the step's last micro-batch (the plain step's one program)."""
        if self.last not in self.programs:
            raise KeyError(f"compiled only {', '.join(self.programs)}; the step's last program is {self.last!r}")
        return self.programs[self.last]


def build_mesh(config: Config, world_size: int) -> Mesh:
    """The device mesh, every axis: pp x dp x tp (pp and tp only when their size is > 1; tp varies
    fastest, so a stage's tp ranks are neighbours, as in Megatron)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world size must be an integer >= 1; got {world_size!r}")
    model_parallel = config.tp_size * config.pp_size
    if world_size % model_parallel != 0:
        if config.pp_size == 1:
            raise ValueError(f"world size {world_size} is not a multiple of Config.tp_size={config.tp_size}")
        raise ValueError(
            f"world size {world_size} is not a multiple of Config.tp_size x pp_size = "
            f"{config.tp_size} x {config.pp_size} = {model_parallel}"
        )
    dp = world_size // model_parallel  # ranks that split the batch; the tp ranks of one dp group share a slice
    sizes = {"pp": config.pp_size} if config.pp_size > 1 else {}
    sizes["dp"] = dp
    if config.tp_size > 1:
        sizes["tp"] = config.tp_size
    return Mesh.of(**sizes)


def splits(mesh: Mesh, config: Config | None = None) -> int:
    """How many pieces dim 0 of a global batch splits into: dp ranks x pipeline micro-batches."""
    micro = config.pp_microbatches if config is not None and config.pp_size > 1 else 1
    return mesh.size("dp") * micro


def check_batch(batch: Sequence[Any], mesh: Mesh, config: Config | None = None) -> None:
    """Every element of a global batch is a tensor whose dim 0 splits over the dp ranks (and, in a
    pipeline, each rank's slice into Config.pp_microbatches micro-batches)."""
    dp, n = mesh.size("dp"), splits(mesh, config)
    for i, x in enumerate(batch):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"example_inputs[{i}] must be a tensor; got {type(x).__name__}")
        if x.dim() == 0:
            raise ValueError(f"example_inputs[{i}] is a scalar; every batch element needs a batch dim 0 to split")
        if x.shape[0] % n != 0:
            into = f"{dp} data-parallel ranks" + (f" x {n // dp} pipeline micro-batches" if n != dp else "")
            raise ValueError(
                f"example_inputs[{i}] has batch size {x.shape[0]} (dim 0), which does not divide into "
                f"{into}; use a batch size that is a multiple of {n}"
            )


def rank_batch(batch: Sequence[torch.Tensor], mesh: Mesh, config: Config | None = None) -> tuple[torch.Tensor, ...]:
    """One rank's slice of the global batch (one micro-batch of it, in a pipeline): the shape the
    program is traced at."""
    n = splits(mesh, config)
    return tuple(x[: x.shape[0] // n] for x in batch)


def passes_for(config: Config, mesh: Mesh, variant: str | None = None, extra_passes: Sequence[Pass] = ()) -> list[Pass]:
    """The pipeline of one program of the step (`variant` of step_variants; None: the last one;
    "stage{s}/{variant}" under pipeline parallelism), then `extra_passes`."""
    stage = None
    if config.pp_size > 1:
        stage, variant = _parse_stage(config, variant)
    variants = step_variants(config)
    if variant is None:
        variant = schedule(config).micro_batches[-1]
    if variant not in variants:
        if config.grad_accum_steps == 1:
            raise ValueError(
                f"variant {variant!r}: a step without accumulation compiles one program, 'step'; "
                "the others need Config.grad_accum_steps > 1"
            )
        raise ValueError(f"variant {variant!r}: this configuration compiles {', '.join(variants)}")
    grad_accum, replicas = variants[variant]
    return pipeline(config, mesh, grad_accum=grad_accum, replicas=replicas, stage=stage) + list(extra_passes)


def _parse_stage(config: Config, name: str | None) -> tuple[int, str | None]:
    """(stage, variant) of a pipeline program's name; a bare variant or None means the last stage's."""
    if name is None or "/" not in name:
        return config.pp_stages - 1, name
    head, variant = name.split("/", 1)
    n = config.pp_stages
    if not head.startswith("stage") or not head[5:].isdigit() or int(head[5:]) >= n:
        raise ValueError(f"program {name!r}: a pipeline of {n} stages names programs stage0/..stage{n - 1}/")
    return int(head[5:]), variant


def program_names(config: Config) -> list[str]:
    """The programs one batch shape needs: the variants, for every pipeline stage."""
    variants = list(step_variants(config))
    if config.pp_size == 1:
        return variants
    return [stage_key(s, v) for s in range(config.pp_stages) for v in variants]


def check_disabled(config: Config, extra_passes: Sequence[Pass] = ()) -> None:
    """Every Config.disable_passes entry names a pass (of any pipeline, or an extra pass)."""
    known = (*PASS_NAMES, *(p.name for p in extra_passes))
    unknown = [name for name in config.disable_passes if name not in known]
    if unknown:
        raise ValueError(
            f"Config.disable_passes names {', '.join(map(repr, unknown))}, which is not a pass; "
            f"passes: {', '.join(known)}"
        )


def capture_step(
    model: nn.Module,
    batch: Sequence[torch.Tensor],
    loss_fn: Callable[..., torch.Tensor] | None,
    config: Config,
    mesh: Mesh,
) -> Traced:
    """The training step captured at one rank's slice of the global `batch` (in the Config's compute dtype)."""
    return _trace(capture, model, batch, loss_fn, config, mesh)


def compile_step(
    model: nn.Module,
    batch: Sequence[torch.Tensor],
    loss_fn: Callable[..., torch.Tensor] | None,
    config: Config,
    mesh: Mesh,
    *,
    variants: Sequence[str] | None = None,
    extra_passes: Sequence[Pass] = (),
    stop_after: str | None = None,
    observer: Observer | None = None,
    log: Callable[[str], None] | None = None,
    passes: Sequence[Pass] | None = None,
) -> Compiled:
    """Capture the training step for the global `batch` and run the pipeline for every program the
    step needs (options as compile_traced). The contracts are checked before the capture starts."""
    pass_lists = plan(config, mesh, variants, extra_passes, stop_after, passes)
    traced = capture_step(model, batch, loss_fn, config, mesh)
    return _run(traced, config, pass_lists, observer, log)


def compile_traced(
    traced: Traced,
    config: Config,
    *,
    variants: Sequence[str] | None = None,
    extra_passes: Sequence[Pass] = (),
    stop_after: str | None = None,
    observer: Observer | None = None,
    log: Callable[[str], None] | None = None,
    passes: Sequence[Pass] | None = None,
) -> Compiled:
    """Run the pipeline of `config` for every program the step needs (`variants`: only these) on a
    copy of `traced` (which stays as captured: compile it again under another Config).
    `stop_after`: a pass name (or "capture") to stop after. `passes`: run these instead of the
    pipeline (tests and benchmarks of single passes). Contracts are checked first."""
    pass_lists = plan(config, traced.program.mesh, variants, extra_passes, stop_after, passes)
    return _run(traced, config, pass_lists, observer, log)


def _run(
    traced: Traced,
    config: Config,
    pass_lists: dict[str, list[Pass]],
    observer: Observer | None,
    log: Callable[[str], None] | None,
) -> Compiled:
    """Each program's passes (already checked by plan) on its own copy of the capture."""
    programs: dict[str, DistProgram] = {}
    records: dict[str, list[PassRecord]] = {}
    for name, passes in pass_lists.items():
        program = clone_program(traced.program)
        if observer is not None:
            observer(name, 0, None, program, None)
        dump = config.dump_dir if config.dump_dir is None or len(pass_lists) == 1 else f"{config.dump_dir}/{name}"
        ctx = PassContext(config, log or (lambda line: None))
        watch = None if observer is None else (lambda i, p, prog, rec, n=name: observer(n, i, p, prog, rec))
        programs[name], records[name] = run_passes(program, passes, ctx, dump_dir=dump, observer=watch)
    compiled = Compiled(traced.program.mesh, programs, records, pass_lists, schedule(config), traced.seconds)
    if config.pp_size > 1:
        compiled.pipeline = pipeline_schedule(config)
        staged = all(any(p.name == "split_stages" for p in passes) for passes in pass_lists.values())
        if staged and set(program_names(config)) <= set(programs):
            check_pipeline_programs(compiled)
    return compiled


def pipeline_holders(compiled: Compiled) -> dict[str, list[int]]:
    """Each parameter's stages, as the step's split placed them."""
    out: dict[str, list[int]] = {}
    for program in compiled.programs.values():
        out.update(program.notes.get(PIPELINE, {}).get("holders", {}))
    return out


def pipeline_schedule(config: Config) -> pp_schedule.PipelineSchedule:
    """The pipeline's table for Config.pp_schedule, and which program variant runs each micro-batch."""
    plain = schedule(config)
    steps = pp_schedule.table(config.pp_schedule, config.pp_size, config.pp_microbatches, config.pp_chunks)
    return pp_schedule.PipelineSchedule(
        config.pp_schedule,
        config.pp_stages,
        config.pp_microbatches,
        tuple(tuple(s) for s in steps),
        plain.micro_batches,
        config.pp_chunks,
    )


def check_pipeline_programs(compiled: Compiled) -> int:
    """Prove the stage programs and the table cannot hang (graphs/pp_schedule.check); each program's
    forward/backward split is kept in its notes for the runtime."""
    pipe = compiled.pipeline
    assert pipe is not None
    mesh = compiled.mesh
    for program in compiled.programs.values():
        if PHASES not in program.notes:
            program.notes[PHASES] = split_phases(program)

    def events(rank: int, step: pp_schedule.Step) -> list:
        stage = pipe.stage(mesh.coords(rank)["pp"], step)
        program = compiled.programs[stage_key(stage, pipe.variants[step.micro_batch])]
        return program.notes[PHASES].events[step.part]

    return pp_schedule.check(mesh, lambda r: list(pipe.steps[mesh.coords(r)["pp"]]), events)


def compile_eval(
    model: nn.Module,
    batch: Sequence[torch.Tensor],
    loss_fn: Callable[..., torch.Tensor] | None,
    config: Config,
    mesh: Mesh,
    *,
    log: Callable[[str], None] | None = None,
    holders: dict[str, list[int]] | None = None,
) -> DistProgram | dict[str, DistProgram]:
    """The forward-only program of eval_step: the same passes, on a graph without a backward.
    Under pipeline parallelism, one per stage (keyed stage_key(s, "eval")), checked as the step's
    are: each stage runs the forward of one micro-batch after another. `holders` (each parameter's
    stages in the training step: pipeline_holders) places the cuts where the step's are."""
    program = _trace(capture_forward, model, batch, loss_fn, config, mesh).program
    eval_config = config.replace(recompute="none", grad_clip=None)
    ctx = PassContext(eval_config, log or (lambda line: None))
    if config.pp_size == 1:
        return run_passes(program, pipeline(eval_config, mesh), ctx)[0]
    programs = {
        stage_key(s, pp_schedule.EVAL): run_passes(
            clone_program(program), pipeline(eval_config, mesh, stage=s, holders=holders), ctx
        )[0]
        for s in range(config.pp_stages)
    }
    table = pp_schedule.eval_table(config.pp_size, config.pp_microbatches, config.pp_chunks)
    for p in programs.values():
        p.notes[PHASES] = split_phases(p)

    def events(rank: int, step: pp_schedule.Step) -> list:
        stage = step.chunk * config.pp_size + mesh.coords(rank)["pp"]
        return programs[stage_key(stage, pp_schedule.EVAL)].notes[PHASES].events[step.part]

    pp_schedule.check(mesh, lambda r: list(table[mesh.coords(r)["pp"]]), events)
    return programs


def plan(
    config: Config,
    mesh: Mesh,
    variants: Sequence[str] | None = None,
    extra_passes: Sequence[Pass] = (),
    stop_after: str | None = None,
    passes: Sequence[Pass] | None = None,
) -> dict[str, list[Pass]]:
    """The passes of every program the step needs (`variants`: only these; `passes`: instead of the
    pipeline), their contracts checked: Config.disable_passes names passes, required ones are not
    disabled, needs and orders hold."""
    check_disabled(config, [*extra_passes, *(passes or ())])
    names = program_names(config) if variants is None else list(variants)
    if passes is not None:
        pass_lists = {name: [*passes, *extra_passes] for name in names}
    else:
        pass_lists = {name: passes_for(config, mesh, name, extra_passes) for name in names}
    if stop_after is not None:
        pass_lists = {name: _until(passes, stop_after) for name, passes in pass_lists.items()}
    for passes in pass_lists.values():
        check_pipeline(passes, tuple(config.disable_passes), force_disable=config.force_disable)
    return pass_lists


def _until(passes: list[Pass], stop_after: str) -> list[Pass]:
    names = [CAPTURE] + [p.name for p in passes]
    if stop_after not in names:
        raise ValueError(f"stop after {stop_after!r}: no such pass in this pipeline; allowed: {', '.join(names)}")
    return passes[: names.index(stop_after)]


def _trace(
    fn: Callable[..., Any],
    model: nn.Module,
    batch: Sequence[torch.Tensor],
    loss_fn: Callable[..., torch.Tensor] | None,
    config: Config,
    mesh: Mesh,
) -> Traced:
    """`fn` (capture or capture_forward) at one rank's slice of the global batch, in the compute dtype."""
    batch = tuple(batch)
    check_batch(batch, mesh, config)
    local = rank_batch(batch, mesh, config)
    with warnings.catch_warnings():
        if any(x.device.type == "meta" for x in local):  # compiled on paper: torch warns of meta kernels' autograd
            warnings.simplefilter("ignore", UserWarning)
        captured = fn(model, local, loss_fn, compute_dtype(config))
    return Traced(DistProgram(captured.gm, captured.signature, mesh, captured.fake_mode), captured.seconds)
