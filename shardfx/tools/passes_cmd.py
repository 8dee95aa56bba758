"""`shardfx passes`: run the pipeline one pass at a time and show what each pass did.

One row per stage (the capture, then each pass): graph nodes, collectives by
kind, bytes they move per step, the estimated per-rank peak memory, and the
time the stage took. The figures come from shardfx.graphs.analysis
(collective_summary, memory_timeline).

    shardfx passes gpt --preset tiny --world-size 2 --zero 3
    shardfx passes gpt --preset tiny --zero 3 --show shard_parameters
    shardfx passes gpt --preset tiny --zero 3 --diff capture shard_parameters
    shardfx passes mlp --zero 2 --dump dumps/ --json stats.json
    shardfx passes my_model.py:make --zero 3 --stop-after shard_parameters
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Any

from shardfx.driver import pipeline_schedule
from shardfx.graphs.format import format_program
from shardfx.tools.graph_diff import diff_programs, format_diff, wrap_line
from shardfx.tools.model_spec import add_model_spec_arguments, model_spec_from_args
from shardfx.tools.options import non_negative_int
from shardfx.tools.stages import (
    Stage,
    add_compile_arguments,
    add_variant_argument,
    compile_stages,
    config_from_args,
    extra_passes_from_args,
    find_stage,
)

NAME = "passes"
HELP = "run the pipeline pass by pass: a table of nodes, collectives, bytes, memory and time per pass"

KIND_ORDER = ("all_gather", "reduce_scatter", "all_reduce")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME, help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_spec_arguments(parser)
    add_compile_arguments(parser)
    add_variant_argument(parser)
    out = parser.add_argument_group("output")
    out.add_argument(
        "--dump", metavar="DIR", help="write the printed program after each stage: DIR/00_capture.txt, ..."
    )
    out.add_argument("--stop-after", metavar="PASS", help="run the pipeline up to this pass ('capture': none)")
    out.add_argument("--show", metavar="PASS", help="print the program after this pass ('capture' or a pass name)")
    out.add_argument(
        "--part",
        choices=("forward", "backward"),
        help="with --show and --config pp_size=P: print the stage's forward or backward part (what the "
        "pipeline runs as one step of its schedule) instead of its joint program",
    )
    out.add_argument(
        "--diff",
        nargs=2,
        metavar=("PASS_A", "PASS_B"),
        help="print the nodes added, removed, moved and changed from stage PASS_A to PASS_B ('capture' is a stage)",
    )
    out.add_argument("--json", dest="json_path", metavar="PATH", help="write the table's figures as JSON")
    out.add_argument(
        "--width",
        type=non_negative_int,
        default=80,
        help="wrap printed programs and diffs to this many columns (0: no wrapping; default %(default)s)",
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    spec = model_spec_from_args(args)
    stages = compile_stages(
        spec,
        config,
        args.world_size,
        extra_passes=extra_passes_from_args(args),
        stop_after=args.stop_after,
        progress=not args.no_progress,
        variant=args.variant,
        stage=args.pp_stage,
    )
    # Check the stage names before printing anything, so a typo fails fast and alone.
    shown = find_stage(stages, args.show, "--show") if args.show else None
    diffed = [find_stage(stages, name, "--diff") for name in args.diff] if args.diff else None
    rows = [stage_row(s) for s in stages]
    print(f"{spec.label}: {spec.num_params():,} parameters, world size {args.world_size}, ZeRO {config.zero_stage}")
    print(format_table(rows, args.width or 80))
    tp_stage = next((s for s in stages if s.name == "tensor_parallel" and s.record is not None), None)
    if tp_stage is not None and not tp_stage.disabled and tp_stage.record.stats.get("layers"):
        print()
        print(format_tp_plan(tp_stage.record.stats, args.width or 80))
    pp_stage = next((s for s in stages if s.name == "split_stages" and s.record is not None), None)
    if pp_stage is not None and not pp_stage.disabled:
        print()
        print(format_pipeline_plan(pp_stage.record.stats))
        print(pipeline_schedule(config).describe())
    if args.dump:
        dump_stages(stages, Path(args.dump))
        print(f"printed programs written to {args.dump}/")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"figures written to {args.json_path}")
    if shown is not None:
        print()
        program, title = shown.program, f"after {shown.name}"
        if args.part is not None:
            from shardfx.graphs.phases import BACKWARD_PART, FORWARD_PART, part_programs

            if config.pp_size == 1:
                raise ValueError("--part shows a pipeline stage's forward or backward; give --config pp_size=P")
            program = part_programs(program)[FORWARD_PART if args.part == "forward" else BACKWARD_PART]
            title += f", the stage's {args.part} part"
        print(wrap_program(format_program(program, title), args.width), end="")
    if diffed is not None:
        print()
        before, after = diffed
        print(format_diff(diff_programs(before.program, after.program), before.name, after.name, args.width), end="")
    return 0


def stage_row(stage: Stage) -> dict[str, Any]:
    row = {"index": stage.index, "name": stage.name, "seconds": stage.seconds, "disabled": stage.disabled}
    return {**row, **stage.stats()}


def format_tp_plan(stats: dict[str, Any], width: int = 80) -> str:
    """The tensor-parallel plan: one row per Linear (style, bytes per rank of its weight, why)."""
    rows = stats["layers"]
    name_w = min(max(len(r["module"]) for r in rows), max(20, width // 2))
    vocab = stats.get("vocab_parallel")
    head = (
        f"tensor-parallel plan: {stats['split_linears']} of {stats['linears']} Linear layers split "
        f"({stats['split_fraction']:.0%} of their bytes); vocab "
        + (f"split ({vocab} classes)" if vocab else f"not split: {stats.get('vocab_reason', '')}")
    )
    lines = [head, f"{'layer':<{name_w}}  {'style':<9} {'per rank':>17}  reason"]
    for r in rows:
        share = f"{format_bytes(r['rank_bytes'])}/{format_bytes(r['bytes'])}"
        lines.append(f"{_fit(r['module'], name_w):<{name_w}}  {r['style']:<9} {share:>17}  {r['reason']}")
    return "\n".join(lines)


def format_pipeline_plan(stats: dict[str, Any]) -> str:
    """The stage cut split_stages chose, and what the shown stage sends and receives."""
    starts, seconds = stats["starts"], stats["stage_seconds"]
    total = sum(seconds) or 1.0
    lines = [f"pipeline: {len(starts)} stages, cut by the {stats['how']}; showing stage {stats['stage']}"]
    held = stats.get("stage_bytes") or [0] * len(starts)
    for i, (start, sec, nbytes) in enumerate(zip(starts, seconds, held)):
        mark = "  <" if i == stats["stage"] else ""
        lines.append(
            f"  stage {i}: from {start or 'the input'}, est. {sec * 1e3:.2f} ms fwd+bwd ({sec / total:.0%}), "
            f"holds ~{format_bytes(nbytes)}{mark}"
        )
    lines.append(f"  this stage: {stats['sends']} sends, {stats['recvs']} receives per micro-batch")
    if stats.get("tied"):
        lines.append(f"  on several stages (gradients summed across them): {', '.join(stats['tied'])}")
    return "\n".join(lines)


def dump_stages(stages: list[Stage], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for s in stages:
        title = f"after {s.name}" + (" (disabled: unchanged)" if s.disabled else "")
        (folder / f"{s.index:02d}_{s.name}.txt").write_text(format_program(s.program, title))


def format_table(rows: list[dict[str, Any]], width: int = 80) -> str:
    kinds = sorted({k for r in rows for k in r["collectives"]}, key=_kind_rank)
    abbrev = {k: "".join(w[0] for w in k.split("_")).upper() for k in kinds}
    fixed = 4 + 7 + sum(max(4, len(abbrev[k])) + 1 for k in kinds) + 11 + 11 + 9  # every column but the name
    name_width = max(12, min(max(len(r["name"]) for r in rows), width - fixed))
    head = f"{'#':>2}  {'stage':<{name_width}} {'nodes':>6}"
    head += "".join(f" {abbrev[k]:>{max(4, len(abbrev[k]))}}" for k in kinds)
    head += f" {'comm/step':>10} {'peak/rank':>10} {'time':>8}"
    lines = [head]
    for r in rows:
        line = f"{r['index']:>2}  {_fit(r['name'], name_width):<{name_width}} {r['nodes']:>6}"
        line += "".join(f" {r['collectives'].get(k, '-'):>{max(4, len(abbrev[k]))}}" for k in kinds)
        time_text = "disabled" if r["disabled"] else _seconds(r["seconds"])
        line += f" {format_bytes(r['comm_bytes']):>10} {format_bytes(r['peak_bytes']):>10} {time_text:>8}"
        lines.append(line)
    legend = []
    if kinds:
        legend.append("collectives: " + ", ".join(f"{abbrev[k]} {k}" for k in kinds) + ".")
    legend.append(
        "comm/step: bytes one rank's collectives move per step, in the ZeRO paper's unit. "
        "peak/rank: estimated peak live memory of one rank (graphs.analysis.memory_timeline)."
    )
    lines.extend(textwrap.wrap(" ".join(legend), width))
    return "\n".join(lines)


def format_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if n < 100 else f"{n:.0f} {unit}"
    raise AssertionError


def wrap_program(text: str, width: int) -> str:
    if width <= 0:
        return text
    return "\n".join(wrap_line(line, width) for line in text.splitlines()) + "\n"


def _kind_rank(kind: str) -> tuple[int, str]:
    return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), kind)


def _seconds(s: float) -> str:
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.1f} ms"


def _fit(name: str, width: int) -> str:
    return name if len(name) <= width else name[: width - 1] + "~"
