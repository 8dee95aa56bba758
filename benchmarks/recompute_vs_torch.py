"""Activation recomputation: shardfx's `recompute` pass against torch's min-cut partitioner, on one joint graph.

    python benchmarks/recompute_vs_torch.py                       # docs/TARGETS.md's GPT, batch 4 x 256: ~15 s on 2 cores
    python benchmarks/recompute_vs_torch.py --layers 8 --seq 512 --budgets 0.9,0.7,0.5 --torch-budgets 1.0,0.5,0.0

Model: shardfx.models.GPT(GPTConfig(vocab_size=1024, n_layer=--layers, d_model=256, n_head=4,
seq_len=--seq)) (tied embedding and head), a batch of --batch x --seq random tokens, fp32, one rank,
loss `gpt_loss`. Nothing is executed: every number is a static estimate from the graph.

The joint graph. The training step is captured ONCE with shardfx's `capture` (torch.export +
AOTAutograd's joint export: forward, loss and backward in ATen) and both methods start from a copy
of that same graph, so the ops, their order and their sizes are identical on both sides:

- shardfx: `compile_traced(traced, Config(recompute=...))` (the compile driver), which is what
  `shardfx.compile_distributed(model, 1, ..., optimizer=None)` runs, minus building a runtime
  (checked to give the same programs). At world size 1 the pipeline is recompute + data_parallel;
  the latter's size-1 all-reduces do not change the peak (the recompute pass's own `peak_after`
  agrees with the final program's peak; the script flags any difference).
- torch: the same graph in the partitioner's calling convention (what AOTAutograd hands to
  `partition_fn` in torch/_functorch/_aot_autograd/graph_compile.py): inputs are the primals
  (parameters and batch, unchanged) plus one placeholder `tangents_1` for d(loss), which capture
  had replaced by `ones_like(loss)`; outputs are (loss, *grads) with `num_fwd_outputs=1`; the
  parameters are `static_lifetime_input_indices` (as torch.compile marks them). Then
  `min_cut_rematerialization_partition` under
  `torch._functorch.config.patch(activation_memory_budget=b)` returns a forward and a backward graph.

Peak memory: the SAME liveness simulation, `shardfx.graphs.analysis.memory_timeline`, for both.
torch's two graphs are stitched into one fx.Graph: the forward's nodes, then `ones_like(loss)` for
the tangent (where capture puts it), then the backward's nodes, each backward placeholder bound to
the forward node of the same name (a saved tensor or a parameter). So a saved tensor lives from its
forward creation to its last backward use, parameters and the batch are held all step, the loss
and the gradients from their creation to the end -- exactly the rule applied to shardfx's program.
(AOTAutograd's runtime also frees saved tensors at their last backward use, as the stitched graph
does.)

Added cost. shardfx: the nodes with meta["shardfx.origin"] == "recompute" (the copies the pass
inserted). torch: the backward graph's call_function nodes whose name also names a call_function
node of its forward graph. Both graphs are cut from one joint graph and keep the joint node names,
so a shared name is a joint node computed twice -- the same rule torch's own partitioner debug log
(AOT_PARTITIONER_DEBUG "# remat/fw/bw") uses. The min-cut partitioner does not tag these nodes
(node.meta["recompute"] is for checkpoint-policy regions only and is unset here). Per counted node:
`node_flops` (torch's FLOP formulas), `node_bytes` (bytes read + written) and `compute_seconds`
(roofline max(FLOPs / peak, bytes / bandwidth) + the profile's per-op overhead) on the "cpu" and
"h100" profiles of shardfx.graphs.cost_model. Views and getitems cost nothing under that model; the
"recomputed nodes" column counts compute nodes and shows views separately ("+v").

shardfx settings: none, full, selective, budget=f for each --budgets fraction (of the peak without
recompute), budget=<torch's peak in bytes> for each torch row below the no-recompute peak (so the
"at equal peak" comparison asks shardfx for exactly torch's peak), and budget=<the lowest reachable
peak> that the pass names when a fraction is unreachable (BudgetUnreachable, raised as PassError).
The pass minimises added time on the Config.hardware profile (--hardware, default "cpu").

"At equal peak": for each torch row, the shardfx row with peak <= torch's peak and the least added
time on the --hardware profile.

Not comparable, by construction: torch's partitioner may also move work between forward and
backward (e.g. compute a cheap backward-only op in the forward), and reorders the backward to
mimic the autograd engine; its budget knob is a fraction of the *saved activation* bytes it
estimates, not of the program's peak. The table states what each actually achieves in one model.
"""

from __future__ import annotations

import argparse
import math
import operator
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch._functorch.config as functorch_config
import torch.fx as fx
from torch._functorch.partitioners import min_cut_rematerialization_partition

from shardfx.config import Config
from shardfx.driver import Traced, build_mesh, capture_step, compile_traced
from shardfx.errors import PassError
from shardfx.graphs import meta
from shardfx.graphs.analysis import ALIAS_OPS, memory_timeline
from shardfx.graphs.cost_model import compute_seconds, hardware, node_bytes, node_flops
from shardfx.graphs.program import DistProgram, Mesh
from shardfx.models import GPT, GPTConfig, gpt_loss
from shardfx.passes.recompute import BudgetUnreachable

MiB = 2**20
aten = torch.ops.aten


@dataclass
class Row:
    method: str  # "shardfx" | "torch min-cut"
    setting: str
    peak: int | None  # bytes; None when the setting is unreachable
    compute_nodes: int = 0
    views: int = 0
    flops: int = 0
    moved: int = 0
    cpu_s: float = 0.0
    h100_s: float = 0.0
    note: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


def added_cost(row: Row, nodes: list[fx.Node]) -> Row:
    """Fill a row's added-cost columns from the recomputed nodes."""
    cpu, h100 = hardware("cpu"), hardware("h100")
    for n in nodes:
        if n.target in ALIAS_OPS or n.target is operator.getitem:
            row.views += 1
            continue
        row.compute_nodes += 1
        row.flops += node_flops(n)
        row.moved += node_bytes(n)
        row.cpu_s += compute_seconds(n, cpu)
        row.h100_s += compute_seconds(n, h100)
    return row


# --------------------------------------------------------------------------- shardfx


def run_shardfx(traced: Traced, config: Config, setting: str) -> Row:
    """One row: the compile driver's pipeline for `config` on a copy of the one capture."""
    try:
        compiled = compile_traced(traced, config)
        program, records = compiled.program, compiled.records[compiled.last]
    except PassError as exc:
        if not isinstance(exc.__cause__, BudgetUnreachable):
            raise
        lowest = re.search(r"\(([\d.]+) MiB; ", str(exc.__cause__))
        row = Row("shardfx", setting, None, note=f"unreachable: lowest reachable peak {lowest.group(1)} MiB")
        row.stats["lowest_mib"] = float(lowest.group(1)) if lowest else None
        return row
    row = Row("shardfx", setting, memory_timeline(program).peak)
    for rec in records:
        if rec.name == "recompute":
            row.stats = dict(rec.stats)
            if rec.stats["peak_after"] != row.peak:
                row.note = f"final peak differs from the pass's peak_after ({rec.stats['peak_after'] / MiB:.2f} MiB)"
    nodes = [n for n in program.graph.nodes if n.meta.get(meta.ORIGIN) == "recompute"]
    return added_cost(row, nodes)


# --------------------------------------------------------------------------- torch


def partitioner_joint(cap: DistProgram) -> tuple[fx.GraphModule, list[int]]:
    """The captured graph in min_cut_rematerialization_partition's calling convention.

    Placeholders: the primals (unchanged names; torch tells primals from tangents by "tangents"
    in the name) then `tangents_1`, which replaces capture's ones_like(loss). Outputs: (loss, *grads).
    Returns the module and the parameter indices among the primals (static lifetime inputs).
    """
    src = cap.gm.graph
    output = next(n for n in src.nodes if n.op == "output")
    loss = output.args[0][0]
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    primals = [n for n in src.nodes if n.op == "placeholder"]
    for n in primals:
        env[n] = graph.node_copy(n)
    tangent = graph.placeholder("tangents_1")
    tangent.meta["val"] = loss.meta["val"]
    for n in src.nodes:
        if n.op in ("placeholder", "output"):
            continue
        if n.target is aten.ones_like.default and n.args[0] is loss:
            env[n] = tangent
            continue
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[a] for a in output.args[0]))
    static = [i for i, spec in enumerate(cap.signature.inputs) if spec.role == "param"]
    return fx.GraphModule(cap.gm, graph), static


def stitch(cap: DistProgram, fw: fx.GraphModule, bw: fx.GraphModule) -> DistProgram:
    """Forward then backward as one graph: backward placeholders bound to the forward's nodes of the
    same name, the tangent to ones_like(loss); outputs (loss, *grads) as in shardfx's programs."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    by_name: dict[str, fx.Node] = {}
    fw_out: list[fx.Node] = []
    for n in fw.graph.nodes:
        if n.op == "output":
            fw_out = [env[a] for a in n.args[0]]
            continue
        env[n] = graph.node_copy(n, lambda a: env[a])
        by_name[n.name] = env[n]
    loss = fw_out[0]
    grads: list[fx.Node] = []
    for n in bw.graph.nodes:
        if n.op == "placeholder":
            if "tangents" in n.name:
                env[n] = graph.call_function(aten.ones_like.default, (loss,))
                env[n].meta["val"] = loss.meta["val"]
            else:
                env[n] = by_name[n.name]
        elif n.op == "output":
            grads = [env[a] for a in n.args[0] if a is not None]
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output((loss, *grads))
    graph.lint()
    return DistProgram(fx.GraphModule(cap.gm, graph), cap.signature, Mesh.of(dp=1), cap.fake_mode)


def run_torch(cap: DistProgram, budget: float) -> tuple[Row, float]:
    joint, static = partitioner_joint(cap)
    start = time.perf_counter()
    with functorch_config.patch(activation_memory_budget=budget):
        fw, bw = min_cut_rematerialization_partition(joint, [], num_fwd_outputs=1, static_lifetime_input_indices=static)
    seconds = time.perf_counter() - start
    fw_names = {n.name for n in fw.graph.nodes if n.op == "call_function"}
    recomputed = [n for n in bw.graph.nodes if n.op == "call_function" and n.name in fw_names]
    tagged = sum(1 for n in bw.graph.nodes if n.meta.get("recompute") is not None)
    row = Row("torch min-cut", f"budget {budget:g}", memory_timeline(stitch(cap, fw, bw)).peak)
    if tagged:
        row.note = f"{tagged} backward nodes carry meta['recompute']"
    saved = sum(1 for n in bw.graph.nodes if n.op == "placeholder") - 1
    row.stats = {"saved_inputs": saved, "partition_s": seconds}
    return added_cost(row, recomputed), seconds


# --------------------------------------------------------------------------- report


def cost_of(row: Row, hw: str) -> float:
    return row.h100_s if hw == "h100" else row.cpu_s


def table(rows: list[Row], fwd_flops: int) -> str:
    lines = [
        "| method | setting | simulated peak MiB | recomputed nodes | added GFLOP (x fwd) | added MB moved "
        "| added ms (cpu) | added ms (h100) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.peak is None:
            lines.append(f"| {r.method} | {r.setting} | {r.note} | | | | | |")
            continue
        lines.append(
            f"| {r.method} | {r.setting} | {r.peak / MiB:.2f} | {r.compute_nodes} (+{r.views}v) "
            f"| {r.flops / 1e9:.3f} ({r.flops / fwd_flops:.2f}x) | {r.moved / 1e6:.1f} "
            f"| {r.cpu_s * 1e3:.2f} | {r.h100_s * 1e3:.3f} |"
        )
    return "\n".join(lines)


def equal_peak(torch_rows: list[Row], ours: list[Row], hw: str) -> str:
    lines = [
        f"At equal peak (cheapest shardfx row by added time on {hw!r} with peak <= torch's):",
        "",
        "| torch setting | torch peak MiB | torch GFLOP / MB / ms cpu / ms h100 | shardfx setting | shardfx peak MiB "
        f"| shardfx GFLOP / MB / ms cpu / ms h100 | added ms shardfx/torch ({hw}) |",
        "|---|---:|---|---|---:|---|---:|",
    ]

    def cost(r: Row) -> str:
        return f"{r.flops / 1e9:.3f} / {r.moved / 1e6:.1f} / {r.cpu_s * 1e3:.2f} / {r.h100_s * 1e3:.3f}"

    for t in torch_rows:
        fits = [r for r in ours if r.peak is not None and r.peak <= t.peak]
        if not fits:
            lines.append(f"| {t.setting} | {t.peak / MiB:.2f} | {cost(t)} | (none reaches it) | | | |")
            continue
        best = min(fits, key=lambda r: (cost_of(r, hw), r.flops, r.peak))
        mine, theirs = cost_of(best, hw), cost_of(t, hw)
        ratio = f"{mine / theirs:.2f}" if theirs > 0 else ("-" if mine == 0 else "inf")
        lines.append(
            f"| {t.setting} | {t.peak / MiB:.2f} | {cost(t)} | {best.setting} | {best.peak / MiB:.2f} "
            f"| {cost(best)} | {ratio} |"
        )
    lowest_ours = min(r.peak for r in ours if r.peak is not None)
    lowest_torch = min(t.peak for t in torch_rows)
    lines += [
        "",
        f"Lowest peak: shardfx {lowest_ours / MiB:.2f} MiB, torch's budget knob {lowest_torch / MiB:.2f} MiB "
        f"(over the budgets run).",
    ]
    return "\n".join(lines)


def pass_stats(rows: list[Row]) -> str:
    lines = [
        "recompute pass stats (engine.pass_records):",
        "",
        "| setting | peak_before MiB | peak_after MiB | recomputed_nodes | added_seconds (ms, Config.hardware) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r.stats
        if r.peak is None or not s:
            continue
        lines.append(
            f"| {r.setting} | {s['peak_before'] / MiB:.2f} | {s['peak_after'] / MiB:.2f} "
            f"| {s['recomputed_nodes']} | {s['added_seconds'] * 1e3:.2f} |"
        )
    return "\n".join(lines)


def checks(ours: list[Row], torch_rows: list[Row], fractions: list[float]) -> list[str]:
    """Flags for a broken measurement or a broken promise of the pass."""
    flags = []
    none_row = next(r for r in ours if r.setting == "none")
    for t in torch_rows:
        if t.setting == "budget 1" and t.peak != none_row.peak:
            flags.append(
                f"baseline mismatch: torch budget 1.0 peak {t.peak / MiB:.2f} MiB vs shardfx none "
                f"{none_row.peak / MiB:.2f} MiB (the partitioner changed more than what is saved)"
            )
    by_fraction = [r for f in fractions for r in ours if r.setting == f"budget {f:g}"]
    last = None
    for r in by_fraction:
        if r.peak is None:
            continue
        if last is not None and r.peak > last.peak:
            flags.append(f"not monotone: {r.setting} peak {r.peak / MiB:.2f} > {last.setting} {last.peak / MiB:.2f}")
        last = r
    for r in ours:
        if r.peak is not None and r.stats.get("target") is not None and r.peak > r.stats["target"]:
            flags.append(f"{r.setting}: peak {r.peak / MiB:.2f} MiB is over its budget")
        if r.note and r.peak is not None:
            flags.append(f"{r.setting}: {r.note}")
    return flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (default 4)")
    parser.add_argument("--seq", type=int, default=256, help="sequence length, also GPTConfig.seq_len (default 256)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per batch, one rank (default 4)")
    parser.add_argument(
        "--budgets",
        default="0.9,0.8,0.7,0.6,0.5,0.45,0.4",
        help="shardfx memory_budget fractions of the no-recompute peak, comma-separated; the lowest "
        "reachable peak the pass names is added as a bytes budget (default 0.9,0.8,0.7,0.6,0.5,0.45,0.4)",
    )
    parser.add_argument(
        "--torch-budgets",
        default="1.0,0.8,0.5,0.3,0.1,0.0",
        help="torch._functorch.config.activation_memory_budget values (default 1.0,0.8,0.5,0.3,0.1,0.0)",
    )
    parser.add_argument(
        "--hardware",
        default="cpu",
        help="Config.hardware: the profile the shardfx pass minimises added time on, and the one 'at equal peak' "
        "compares added time on (default cpu; h100 is the other one reported)",
    )
    args = parser.parse_args()
    fractions = [float(x) for x in args.budgets.split(",") if x]
    torch_budgets = [float(x) for x in args.torch_budgets.split(",") if x]
    wall = time.perf_counter()

    torch.manual_seed(0)
    gpt = GPTConfig(vocab_size=1024, n_layer=args.layers, d_model=256, n_head=4, seq_len=args.seq)
    model = GPT(gpt)
    tokens = torch.randint(0, gpt.vocab_size, (args.batch, args.seq))
    targets = torch.randint(0, gpt.vocab_size, (args.batch, args.seq))
    traced = capture_step(model, (tokens, targets), gpt_loss, Config(), build_mesh(Config(), 1))
    cap = traced.program  # the joint graph as captured: torch's partitioner starts from it too
    fwd_flops = sum(node_flops(n) for n in cap.gm.graph.nodes if n.meta.get(meta.PHASE) == meta.FORWARD)

    torch_rows: list[Row] = []
    torch_seconds = 0.0
    for b in torch_budgets:
        row, seconds = run_torch(cap, b)
        torch_rows.append(row)
        torch_seconds += seconds

    start = time.perf_counter()
    base = Config(hardware=args.hardware)
    ours = [
        run_shardfx(traced, base, "none"),
        run_shardfx(traced, base.replace(recompute="full"), "full"),
        run_shardfx(traced, base.replace(recompute="selective"), "selective"),
    ]
    none_peak = ours[0].peak
    lowest: float | None = None
    for f in fractions:
        row = run_shardfx(traced, base.replace(recompute="budget", memory_budget=f), f"budget {f:g}")
        row.stats.setdefault("target", f * none_peak if row.peak is not None else None)
        ours.append(row)
        if row.peak is None and row.stats.get("lowest_mib") is not None:
            lowest = row.stats["lowest_mib"]
    byte_budgets: list[tuple[float, str]] = []
    if lowest is not None:  # the MiB it names is rounded to 0.01: ask for that plus half a step
        byte_budgets.append((math.ceil((lowest + 0.005) * MiB), "lowest reachable"))
    for t in torch_rows:
        if t.peak < none_peak:
            byte_budgets.append((t.peak, f"= torch {t.setting}"))
    for nbytes, why in byte_budgets:
        row = run_shardfx(
            traced,
            base.replace(recompute="budget", memory_budget=float(nbytes)),
            f"budget {nbytes / MiB:.2f} MiB ({why})",
        )
        row.stats.setdefault("target", nbytes if row.peak is not None else None)
        ours.append(row)
    ours_seconds = time.perf_counter() - start

    print(
        f"GPT {args.layers} layers, d_model 256, 4 heads, vocab 1024, batch {args.batch} x {args.seq}, fp32, one rank; "
        f"torch {torch.__version__}; forward {fwd_flops / 1e9:.3f} GFLOP; "
        f"joint graph {len(cap.gm.graph.nodes)} nodes (capture {traced.seconds:.1f} s)\n"
    )
    print(table(ours + torch_rows, fwd_flops))
    print()
    print(equal_peak(torch_rows, ours, args.hardware))
    print()
    print(pass_stats(ours))
    print()
    flags = checks(ours, torch_rows, fractions)
    for flag in flags:
        print(f"FLAG: {flag}")
    print(
        f"{'' if flags else 'No flags. '}Partitioner {torch_seconds:.1f} s over {len(torch_rows)} budgets; shardfx "
        f"passes {ours_seconds:.1f} s over {len(ours)} settings; wall {time.perf_counter() - wall:.1f} s."
    )


if __name__ == "__main__":
    main()
