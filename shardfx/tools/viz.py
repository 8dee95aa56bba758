"""`shardfx viz`: draw the program at any stage, as interactive HTML or SVG, and plot its live memory.

    shardfx viz gpt --preset tiny --zero 3 -o zero3.html                  # after the whole pipeline
    shardfx viz gpt --preset tiny --zero 3 --compare capture -o diff.html # two stages side by side
    shardfx viz gpt --preset tiny --zero 3 -o z3.html --trace z3.json     # + the simulated step (Perfetto)
    shardfx viz gpt --preset tiny --zero 3 -o z3.html --measured-trace step.json  # + `shardfx train --trace`'s
    shardfx viz mlp --zero 2 --after shard_gradients -o mlp.svg           # graphviz 'dot'
    shardfx viz gpt --preset tiny --set n_layer=48 --depth 2 -o gpt48.svg # modules below depth 2 as boxes
    shardfx viz gpt --preset tiny --zero 3 --memory-plot memory.png       # needs matplotlib

The HTML file is self-contained (inline CSS and JS, no network): nodes grouped
and collapsible by module path, colored by kind (compute, collective,
recompute, fused) and phase (forward, backward, optimizer), details per node
(shape, dtype, placement, origin, source line), search by name, and two
stages side by side with --compare. The SVG needs graphviz's `dot`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from shardfx.graphs.analysis import memory_timeline
from shardfx.graphs.cost_model import hardware, trace
from shardfx.tools.model_spec import add_model_spec_arguments, model_spec_from_args
from shardfx.tools.options import positive_int, unwritable
from shardfx.tools.stages import (
    Stage,
    add_compile_arguments,
    add_variant_argument,
    compile_stages,
    config_from_args,
    extra_passes_from_args,
    find_stage,
)
from shardfx.tools.viz_html import node_records, render_html

NAME = "viz"
HELP = "draw the program after a pass: interactive offline HTML or SVG (graphviz), and a live-memory plot"

FILL = {
    "compute": "#edf2fa",
    "collective": "#ffd8a8",
    "recompute": "#d3f9d8",
    "fused": "#e5dbff",
    "input": "#f1f3f5",
    "output": "#f1f3f5",
}
PHASE_COLOR = {"fwd": "#1c7ed6", "bwd": "#e03131", "opt": "#2f9e44", "": "#adb5bd"}
TOP = "(top level)"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME, help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_spec_arguments(parser)
    add_compile_arguments(parser)
    add_variant_argument(parser)
    out = parser.add_argument_group("output")
    out.add_argument(
        "-o", "--output", metavar="FILE", help="write the program drawing: FILE.html (interactive) or FILE.svg"
    )
    out.add_argument("--after", metavar="PASS", help="draw the program after this pass ('capture': none; default: all)")
    out.add_argument(
        "--compare", metavar="PASS", help="HTML: show this stage side by side with --after, marking what changed"
    )
    out.add_argument(
        "--depth",
        type=positive_int,
        metavar="D",
        help="SVG: draw each module group D levels below the top as one box (for large models)",
    )
    out.add_argument(
        "--memory-plot", metavar="FILE.png", help="plot the live bytes of one rank over the step (needs matplotlib)"
    )
    out.add_argument(
        "--trace",
        metavar="FILE.json",
        help="write the cost model's simulated step of the drawn program as a Chrome/Perfetto trace "
        "(a compute and a communication track per rank; exposed communication marked); the HTML links to it",
    )
    out.add_argument(
        "--measured-trace",
        metavar="FILE.json",
        help="HTML: link a measured step written by `shardfx train --trace FILE.json` (every rank measured, "
        "the simulated step beside it) from the page; the file is read, not rewritten",
    )
    out.add_argument(
        "--hardware",
        default="auto",
        help="the cost model's profile for --trace (default: this machine's; cpu, a100, h100, h200, h100-ib)",
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if not args.output and not args.memory_plot and not args.trace:
        raise ValueError(
            "nothing to write: give -o FILE.html|FILE.svg, --memory-plot FILE.png and/or --trace FILE.json"
        )
    if args.trace and Path(args.trace).suffix.lower() != ".json":
        raise ValueError(f"--trace {args.trace}: the file name must end in .json")
    measured = measured_link(args.measured_trace, args.output) if args.measured_trace else None
    hw = hardware(args.hardware)  # an unknown profile is an error before compiling
    suffix = Path(args.output).suffix.lower() if args.output else ""
    if args.output and suffix not in (".html", ".htm", ".svg"):
        raise ValueError(f"-o {args.output}: the file name must end in .html or .svg")
    if suffix == ".svg":
        if args.compare:  # a usage error comes before a missing tool
            raise ValueError("--compare draws two stages side by side in HTML; write -o FILE.html")
        dot_path()  # fail before compiling when graphviz is missing
    if args.memory_plot:
        _pyplot()
    for flag, path in (("-o", args.output), ("--trace", args.trace), ("--memory-plot", args.memory_plot)):
        problem = path and unwritable(path, is_dir=False)
        if problem:
            raise ValueError(f"{flag} {path}: {problem}; choose a path you can write")
    config = config_from_args(args)
    spec = model_spec_from_args(args)
    stages = compile_stages(
        spec,
        config,
        args.world_size,
        extra_passes=extra_passes_from_args(args),
        progress=not args.no_progress,
        variant=args.variant,
        stage=args.pp_stage,
    )
    stage = find_stage(stages, args.after, "--after") if args.after else stages[-1]
    shown = [stage]
    if args.compare:
        other = find_stage(stages, args.compare, "--compare")
        shown = sorted({stage.index: stage, other.index: other}.values(), key=lambda s: s.index)
    title = f"{spec.label}, world size {args.world_size}, ZeRO {config.zero_stage}: " + " vs ".join(
        f"after {s.name}" for s in shown
    )
    link = None
    if args.trace:
        events = trace(stage.program, hw)
        Path(args.trace).write_text(json.dumps(events))
        step_ms = events["otherData"]["step_ms"]
        print(f"wrote {args.trace} (simulated step {step_ms:.1f} ms on {hw.name}; open it in ui.perfetto.dev)")
        page_dir = Path(args.output or ".").resolve().parent
        link = {"file": os.path.relpath(Path(args.trace).resolve(), page_dir), "step_ms": step_ms, "hardware": hw.name}
    if suffix == ".svg":
        Path(args.output).write_text(render_svg(stage, args.depth))
        print(f"wrote {args.output} (after {stage.name}, {len(stage.program.graph.nodes)} nodes)")
    elif args.output:
        Path(args.output).write_text(render_html(title, shown, link, measured))
        print(f"wrote {args.output} ({' vs '.join(s.name for s in shown)}); open it in a browser, works offline")
        if measured is not None:
            print(
                f"linked {args.measured_trace} from it (measured step {measured['step']}: {measured['step_ms']:.1f} ms)"
            )
    if args.memory_plot:
        plot_memory(shown, args.memory_plot, spec.label)
        print(f"wrote {args.memory_plot} (live memory of one rank)")
    return 0


def measured_link(path: str, output: str | None) -> dict[str, Any]:
    """What the page shows of a measured trace (`shardfx train --trace`), checked before compiling: the
    file relative to the page, its step and its measured and simulated step times."""
    if not output or Path(output).suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"--measured-trace {path} is linked from the HTML page: give -o FILE.html")
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not JSON"
        raise ValueError(f"--measured-trace {path}: cannot read it ({reason})") from None
    other = data.get("otherData") if isinstance(data, dict) else None
    if not isinstance(other, dict) or other.get("measured") is not True:
        raise ValueError(
            f"--measured-trace {path}: not a measured step (no otherData.measured); write one with "
            "`shardfx train --trace FILE.json` (for the simulated step use --trace here)"
        )
    page_dir = Path(output).resolve().parent
    link = {"file": os.path.relpath(Path(path).resolve(), page_dir)}
    link.update({k: other.get(k) for k in ("step", "step_ms", "simulated_step_ms", "hardware")})
    return link


def dot_path() -> str:
    path = shutil.which("dot")
    if path is None:
        raise ValueError(
            "SVG output needs graphviz's 'dot', which is not on PATH: install graphviz "
            "(apt-get install graphviz, brew install graphviz) or write HTML instead (-o FILE.html)"
        )
    return path


def render_svg(stage: Stage, depth: int | None = None) -> str:
    result = subprocess.run(
        [dot_path(), "-Tsvg"], input=to_dot(stage, depth), capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"dot failed (exit {result.returncode}): {result.stderr.strip()}")
    return result.stdout


def to_dot(stage: Stage, depth: int | None = None) -> str:
    """The program as a graphviz digraph: nested clusters per module, a box per node.

    With `depth`, every module `depth` levels below the top is one box (with its
    node count and kinds) inside its parent's cluster.
    """
    records = node_records(stage)

    def place(r: dict[str, Any]) -> tuple[list[str], str, str | None]:  # (cluster path, dot node, group)
        parts = r["m"].split(".") if r["m"] else [TOP]
        if depth is not None and len(parts) >= depth:
            group = ".".join(parts[:depth])
            return parts[: depth - 1], "g_" + _ident(group), group
        return parts, f"n{r['i']}", None

    placed = [place(r) for r in records]
    members: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r, (_, _, group) in zip(records, placed):
        if group is not None:
            members[group].append(r)
    tree: dict[str, Any] = {}  # module path parts, nested; key "" holds the dot lines drawn at that level
    for r, (parts, _, group) in zip(records, placed):
        if group is not None and members[group][0] is not r:
            continue  # a collapsed group is drawn once
        level = tree
        for p in parts:
            level = level.setdefault(p, {})
        level.setdefault("", []).append(_group_line(group, members[group]) if group else _node_line(r))
    box_of = {r["i"]: box for r, (_, box, _) in zip(records, placed)}
    lines = [
        "digraph program {",
        '  graph [rankdir=TB, fontname="Helvetica", fontsize=11, newrank=true];',
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=9, penwidth=2];',
        '  edge [color="#868e96", arrowsize=0.5];',
    ]
    _emit(tree, "", lines, "  ")
    edges = {(box_of[a], box_of[r["i"]]) for r in records for a in r["a"]}
    lines.extend(f"  {a} -> {b};" for a, b in sorted(edges) if a != b)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _emit(level: dict[str, Any], path: str, lines: list[str], indent: str) -> None:
    lines.extend(indent + ln for ln in level.get("", []))
    for part, sub in level.items():
        if part == "":
            continue
        full = f"{path}.{part}" if path else part
        lines.append(f'{indent}subgraph "cluster_{full}" {{')
        lines.append(f'{indent}  label="{_escape(full)}"; style="rounded"; color="#ced4da";')
        _emit(sub, full, lines, indent + "  ")
        lines.append(f"{indent}}}")


def _node_line(r: dict[str, Any]) -> str:
    shape = f"{r['dt']}{r['sh']}" if isinstance(r["sh"], list) else r["sh"]
    label = "\\n".join(_escape(x) for x in (r["n"], r["op"], shape + (f" {r['pl']}" if r["pl"] else "")))
    tip = _escape(f"{r['k']} {r['ph']} origin={r['o']} {r['src']}".strip())
    return f'n{r["i"]} [label="{label}", fillcolor="{FILL[r["k"]]}", color="{PHASE_COLOR[r["ph"]]}", tooltip="{tip}"];'


def _group_line(group: str, nodes: list[dict[str, Any]]) -> str:
    kinds = Counter(r["k"] for r in nodes)
    summary = ", ".join(f"{n} {k}" for k, n in kinds.most_common())
    label = f"{_escape(group)}\\n{len(nodes)} nodes\\n{summary}"
    fill = FILL["collective"] if kinds["collective"] else FILL["compute"]
    return f'g_{_ident(group)} [label="{label}", fillcolor="{fill}", color="#495057", shape=box3d];'


def _ident(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--memory-plot needs matplotlib, which is not installed: pip install matplotlib") from None
    return plt


def plot_memory(stages: list[Stage], path: str, label: str = "") -> None:
    """Live bytes of one rank while each node runs (graphs.analysis.memory_timeline), one line per stage."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 4.5), dpi=100)
    for stage in stages:
        timeline = memory_timeline(stage.program)
        mib = [b / 2**20 for b in timeline.live]
        (line,) = ax.plot(
            range(len(mib)), mib, lw=1.2, label=f"after {stage.name} (peak {timeline.peak_mib():.2f} MiB)"
        )
        peak_at = timeline.live.index(timeline.peak)
        ax.annotate(
            f"peak: %{timeline.peak_node.name}",
            (peak_at, timeline.peak_mib()),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
            color=line.get_color(),
        )
        held = timeline.held / 2**20
        ax.axhline(held, color=line.get_color(), lw=0.8, ls=":", label=f"held all step (inputs): {held:.2f} MiB")
    # Background bands: the phases of the latest stage's nodes (forward, backward, optimizer).
    _phase_bands(ax, [r["ph"] for r in node_records(stages[-1])])
    ax.set_xlabel("node (execution order)")
    ax.set_ylabel("live MiB (one rank)")
    ax.set_title(f"live memory: {label}" if label else "live memory", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.margins(x=0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _phase_bands(ax: Any, phases: list[str]) -> None:
    colors = {"fwd": "#d0ebff", "bwd": "#ffe3e3", "opt": "#d3f9d8"}
    start = 0
    for i in range(1, len(phases) + 1):
        if i == len(phases) or phases[i] != phases[start]:
            if phases[start] in colors:
                ax.axvspan(start - 0.5, i - 0.5, color=colors[phases[start]], lw=0, zorder=0)
            start = i
