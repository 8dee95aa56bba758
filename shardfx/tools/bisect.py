"""`shardfx bisect`: the first pass after which the program stops matching single-process eager.

Every prefix of the pipeline (the capture alone, then + pass 1, + pass 2, ...)
runs one step (no optimizer) on the local runtime; its loss and every
parameter's gradient are compared with eager PyTorch on the same global batch:

  before the pass that reduces gradients (data_parallel or a ZeRO pass), each
  rank holds its own batch slice's loss and gradients: they are averaged here
  over the data-parallel ranks, on the host, as that pass would; from that
  pass on, each rank's loss and gradient must match eager by itself. A rank's
  gradient is compared with its piece of eager's: its tensor-parallel slice,
  then its ZeRO shard (the ShardSpecs of the program).

The eager reference follows the facts the passes declare they provide
(passes/facts.py), not their names: until a pass provides global batch
statistics (sync_batch_norm) every rank normalizes with its own batch
statistics, so the reference is eager on each dp slice, averaged; once one
provides clipped gradients (clip_gradients) the reference gradients are
clipped. Passes may be disabled with --disable, required ones too (bisect
forces it): that is how to see what a pass is for. A prefix whose parameters
are still in the captured compute dtype (bf16, before apply_mixed_precision)
runs on a bf16 copy of the model.

    shardfx bisect gpt --preset tiny --zero 3
    shardfx bisect gpt --preset tiny --world-size 4 --config tp_size=2 --zero 3
    shardfx bisect mlp --append-pass tests/tools/broken_pass.py:drop_one_grad_reduction
    shardfx bisect my_model.py:make --bf16 --grad-clip 1.0

Exit codes: 0 every stage matches; 1 a stage diverges or fails to run (the
report names the pass, the rank, the parameter and the size of the difference).
"""

from __future__ import annotations

import argparse
import copy
import textwrap
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from shardfx.config import Config
from shardfx.driver import build_mesh
from shardfx.graphs import meta
from shardfx.graphs.capture import extract_loss
from shardfx.graphs.placement import local_shard
from shardfx.graphs.program import DistProgram
from shardfx.graphs.signature import PARAM
from shardfx.passes import facts
from shardfx.passes.manager import Pass
from shardfx.runtime.local import LocalRuntime
from shardfx.tools.model_spec import ModelSpec, add_model_spec_arguments, model_spec_from_args
from shardfx.tools.options import positive_float
from shardfx.tools.stages import Stage, add_compile_arguments, compile_stages, config_from_args, extra_passes_from_args

NAME = "bisect"
HELP = "find the first pass after which the loss or a gradient stops matching single-process eager"

EXIT_DIVERGED = 1
FP32_TOLERANCE = 1e-5  # rtol and atol: the parity tests' fp32 tolerance
BF16_TOLERANCE = 5e-2  # bf16 keeps 8 bits of mantissa: about 2 significant digits


@dataclass
class Mismatch:
    what: str  # "loss" or "gradient"
    param: str  # "" for the loss
    rank: int | None  # None: the mean over the ranks (before gradients are reduced)
    max_abs: float
    max_rel: float  # max_abs relative to the largest |expected|
    index: tuple[int, ...] = ()
    actual: float = 0.0
    expected: float = 0.0
    note: str = ""  # instead of the numbers: a missing gradient, a wrong shape

    def where(self) -> str:
        rank = "the mean over ranks" if self.rank is None else f"rank {self.rank}"
        return f"{self.what}{f' of {self.param}' if self.param else ''} on {rank}"

    def describe(self) -> str:
        if self.note:
            return f"{self.where()}: {self.note}"
        at = f" at {list(self.index)}" if self.index else ""
        return (
            f"{self.where()}: max |diff| {self.max_abs:.3g} (relative {self.max_rel:.3g}){at}: "
            f"got {self.actual:.6g}, eager {self.expected:.6g}"
        )


@dataclass
class StageCheck:
    stage: Stage
    loss_diff: float = 0.0
    grad_diff: float = 0.0
    worst_grad: str = ""
    mismatches: list[Mismatch] = field(default_factory=list)
    error: str | None = None  # the program failed to run

    @property
    def ok(self) -> bool:
        return self.error is None and not self.mismatches


@dataclass
class BisectResult:
    checks: list[StageCheck]
    rtol: float
    atol: float

    @property
    def first_bad(self) -> StageCheck | None:
        return next((c for c in self.checks if not c.ok), None)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME, help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_spec_arguments(parser)
    add_compile_arguments(parser)
    check = parser.add_argument_group("comparison")
    check.add_argument(
        "--rtol",
        type=positive_float,
        help=f"relative tolerance (default {FP32_TOLERANCE}; {BF16_TOLERANCE} with --bf16)",
    )
    check.add_argument(
        "--atol",
        type=positive_float,
        help=f"absolute tolerance (default {FP32_TOLERANCE}; {BF16_TOLERANCE} with --bf16)",
    )
    check.add_argument(
        "--keep-going", action="store_true", help="check every stage, not only up to the first divergence"
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    spec = model_spec_from_args(args)
    result = bisect(
        spec,
        config,
        args.world_size,
        extra_passes=extra_passes_from_args(args),
        rtol=args.rtol,
        atol=args.atol,
        keep_going=args.keep_going,
        progress=not args.no_progress,
    )
    print(f"{spec.label}: world size {args.world_size}, ZeRO {config.zero_stage}, against single-process eager")
    print(format_report(result))
    return 0 if result.first_bad is None else EXIT_DIVERGED


def bisect(
    spec: ModelSpec,
    config: Config,
    world_size: int,
    *,
    extra_passes: list[Pass] = (),
    rtol: float | None = None,
    atol: float | None = None,
    keep_going: bool = False,
    progress: bool = False,
) -> BisectResult:
    """Check every prefix of the pipeline (plus `extra_passes`) against eager; stops at the first divergence."""
    if config.grad_accum_steps > 1:
        raise ValueError(
            f"bisect checks one step against eager; grad_accum_steps={config.grad_accum_steps} compiles several "
            "programs a step (see them with shardfx passes --variant); bisect without it"
        )
    if config.pp_size > 1:
        raise ValueError(
            f"bisect runs one program on every rank; pp_size={config.pp_size} runs a program per stage over a "
            "schedule (see one with shardfx passes --pp-stage S); bisect without pipeline parallelism"
        )
    default = BF16_TOLERANCE if config.mixed_precision is not None else FP32_TOLERANCE
    rtol = default if rtol is None else rtol
    atol = default if atol is None else atol
    # bisect disables passes to find what breaks: a required one too (the contracts still hold)
    config = config.replace(force_disable=True)
    stages = compile_stages(spec, config, world_size, extra_passes=extra_passes, progress=progress)
    mesh = build_mesh(config, world_size)
    references: dict[tuple[bool, float | None], tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
    checks: list[StageCheck] = []
    applied: set[str] = set()  # facts the passes so far provide: they say how the eager reference changes
    reduced = False
    for stage in tqdm(stages, desc="bisect", unit="stage", disable=True if not progress else None, leave=False):
        check = StageCheck(stage)
        checks.append(check)
        if stage.disabled:
            continue
        applied.update(stage.provides)
        reduced = reduced or reduces_gradients(stage.program)
        key = (facts.GLOBAL_BATCH_STATS in applied, config.grad_clip if facts.CLIPPED_GRADIENTS in applied else None)
        if key not in references:
            references[key] = eager_reference(spec, mesh.size("dp"), global_batch_norm=key[0], max_norm=key[1])
        try:
            losses, grads = run_step(stage.program, spec)
        except Exception as exc:  # noqa: BLE001 - reported as this stage's failure
            check.error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        else:
            _compare(check, stage.program, losses, grads, *references[key], reduced, rtol, atol)
        if not check.ok and not keep_going:
            break
    return BisectResult(checks, rtol, atol)


def eager_reference(
    spec: ModelSpec, dp: int, *, global_batch_norm: bool = True, max_norm: float | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of single-process eager PyTorch on the global batch.

    global_batch_norm=False: the mean of eager on each of the `dp` data-parallel slices (what
    ranks with their own batch statistics compute). max_norm: gradients clipped as
    torch.nn.utils.clip_grad_norm_.
    """
    slices = [spec.batch] if global_batch_norm else [tuple(x.chunk(dp)[r] for x in spec.batch) for r in range(dp)]
    results = [eager_step(spec, batch) for batch in slices]
    loss = torch.stack([loss for loss, _ in results]).mean()
    grads = {name: torch.stack([g[name] for _, g in results]).mean(0) for name in results[0][1]}
    if max_norm is not None:
        norm = torch.stack([g.double().pow(2).sum() for g in grads.values()]).sum().sqrt()
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        grads = {name: g * coef.to(g.dtype) for name, g in grads.items()}
    return loss, grads


def eager_step(spec: ModelSpec, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = copy.deepcopy(spec.model)
    if spec.loss_fn is None:
        loss = extract_loss(model(*batch))
    else:
        loss = extract_loss(spec.loss_fn(model(*batch[:-1]), batch[-1]), "the loss_fn")
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def run_step(program: DistProgram, spec: ModelSpec) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Every rank's loss and gradients from one step of `program` on the local runtime (no optimizer).
    Rank r runs the batch slice of its dp coordinate (the tp ranks of a dp group share one)."""
    runtime = LocalRuntime(program, _in_captured_dtypes(program, spec.model), None, keep_outputs=True)
    mesh = program.mesh
    try:
        chunks = [torch.chunk(x, mesh.size("dp"), dim=0) for x in spec.batch]
        runtime.step([tuple(c[mesh.coords(r)["dp"]] for c in chunks) for r in range(mesh.world_size)])
    finally:
        runtime.close()
    outputs = [runtime.outputs[r] for r in range(mesh.world_size)]
    return [out.loss.detach() for out in outputs], [out.grads for out in outputs]


def _in_captured_dtypes(program: DistProgram, model: torch.nn.Module) -> torch.nn.Module:
    """The model, or a copy whose parameters have the dtypes the program's inputs expect (bf16 before
    apply_mixed_precision makes them fp32 masters)."""
    params = dict(model.named_parameters())
    wanted = {
        spec.name: node.meta["val"].dtype
        for spec, node in zip(program.signature.inputs, program.placeholders())
        if spec.role == PARAM and spec.name in params
    }
    if all(params[name].dtype == dtype for name, dtype in wanted.items()):
        return model
    model = copy.deepcopy(model)
    for name, p in model.named_parameters():
        if name in wanted:
            p.data = p.data.to(wanted[name])
    return model


def reduces_gradients(program: DistProgram) -> bool:
    """Whether a pass has reduced the gradients across ranks (data_parallel or a ZeRO pass has run)."""
    return any(meta.role(n) == meta.GRAD_SYNC for n in program.graph.nodes)


def format_report(result: BisectResult, width: int = 80) -> str:
    name_width = min(max([5] + [len(c.stage.name) for c in result.checks]), 24)
    head = f"{'#':>2}  {'after':<{name_width}} {'loss':>9} {'grad':>9}  {'status':<8}  worst gradient [rank]"
    lines = [head]
    for c in result.checks:
        status = "disabled" if c.stage.disabled else "ok" if c.ok else "FAILED" if c.error else "DIVERGED"
        numbers = "" if c.stage.disabled or c.error else f"{c.loss_diff:>9.2g} {c.grad_diff:>9.2g}"
        line = f"{c.stage.index:>2}  {_fit(c.stage.name, name_width):<{name_width}} {numbers:>19}  {status:<8}  "
        lines.append(line + _fit(c.worst_grad, max(8, width - len(line)), left=True))
    lines.append("loss, grad: largest |difference| from eager (all ranks, all parameters)")
    bad = result.first_bad
    tolerance = f"rtol {result.rtol:g}, atol {result.atol:g}"
    if bad is None:
        lines.append(f"no divergence: every stage matches eager within {tolerance}")
        return "\n".join(textwrap_lines(lines, width))
    stage = bad.stage
    what = "the capture" if stage.index == 0 else f"pass {stage.name!r} (stage {stage.index})"
    before = "" if stage.index == 0 else f"; the stages before it match eager within {tolerance}"
    if bad.error is not None:
        lines.append(f"first failure: running the program after {what} failed{before}")
        lines.append(f"  {bad.error}")
        return "\n".join(textwrap_lines(lines, width))
    worst = max(bad.mismatches, key=lambda m: m.max_abs)
    lines.append(f"first divergence: after {what}{before}")
    lines.append(f"  {worst.describe()}")
    others = len(bad.mismatches) - 1
    if others:
        names = sorted({m.where() for m in bad.mismatches if m is not worst})
        listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        lines.append(f"  and {others} more beyond {tolerance}: {listed}")
    return "\n".join(textwrap_lines(lines, width))


def _compare(
    check: StageCheck,
    program: DistProgram,
    losses: list[torch.Tensor],
    grads: list[dict[str, torch.Tensor]],
    expected_loss: torch.Tensor,
    expected_grads: dict[str, torch.Tensor],
    reduced: bool,
    rtol: float,
    atol: float,
) -> None:
    def compare(what: str, param: str, rank: int | None, actual: torch.Tensor, expected: torch.Tensor) -> float:
        if actual.shape != expected.shape:
            note = f"shape {list(actual.shape)}, eager {list(expected.shape)}"
            check.mismatches.append(Mismatch(what, param, rank, float("inf"), float("inf"), note=note))
            return float("inf")
        mismatch = _mismatch(what, param, rank, actual, expected, rtol, atol)
        if mismatch is not None:
            check.mismatches.append(mismatch)
        return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0

    ranks = range(len(losses))
    if reduced:
        check.loss_diff = max(compare("loss", "", r, losses[r], expected_loss) for r in ranks)
    else:
        check.loss_diff = compare("loss", "", None, torch.stack(losses).double().mean(), expected_loss.double())
    for spec in program.signature.inputs:
        name = spec.name
        if spec.role != PARAM or name not in expected_grads:
            continue
        expected = expected_grads[name]
        missing = [r for r in ranks if name not in grads[r]]
        if missing:
            note = "no gradient returned (eager has one)"
            check.mismatches.append(Mismatch("gradient", name, missing[0], float("inf"), float("inf"), note=note))
            continue
        mesh, specs = program.mesh, program.specs(name)
        # rank r's piece of eager's gradient: its tp slice, then its (padded) ZeRO shard
        piece = {r: local_shard(expected, specs, mesh.coords(r)) for r in ranks}
        if reduced:
            diffs = [(compare("gradient", name, r, grads[r][name], piece[r]), r) for r in ranks]
        else:  # each rank's own batch slice: average over the dp ranks holding the same piece, as the dp pass would
            firsts = [r for r in ranks if mesh.coords(r)["dp"] == 0]
            means = {r: torch.stack([grads[q][name].double() for q in mesh.group(r, "dp")]).mean(0) for r in firsts}
            one = len(firsts) == 1
            diffs = [
                (compare("gradient", name, None if one else r, means[r], piece[r].double()), None if one else r)
                for r in firsts
            ]
        diff, rank = max(diffs, key=lambda d: d[0])
        if diff >= check.grad_diff:
            check.grad_diff = diff
            check.worst_grad = name + ("" if rank is None else f" [{rank}]")


def _mismatch(
    what: str, param: str, rank: int | None, actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float
) -> Mismatch | None:
    a, e = actual.detach().double(), expected.detach().double()
    if torch.allclose(a, e, rtol=rtol, atol=atol):
        return None
    diff = (a - e).abs()
    flat = int(diff.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.dim() else ()
    max_abs = diff.max().item()
    scale = e.abs().max().item()
    return Mismatch(
        what, param, rank, max_abs, max_abs / scale if scale else float("inf"), index, a[index].item(), e[index].item()
    )


def textwrap_lines(lines: list[str], width: int) -> list[str]:
    out: list[str] = []
    for line in lines:
        indent = " " * (len(line) - len(line.lstrip()))
        out.extend(textwrap.wrap(line, width, subsequent_indent=indent + "  ") if len(line) > width else [line])
    return out


def _fit(text: str, width: int, left: bool = False) -> str:
    if len(text) <= width:
        return text
    return "~" + text[-(width - 1) :] if left else text[: width - 1] + "~"
