"""The planner's pick against a measured sweep: is Config(plan="auto") within 10% of the best that fits?

    python benchmarks/planner_sweep.py                                  # world sizes 2 and 4
    python benchmarks/planner_sweep.py --world-sizes 2 --steps 10 --memory-mib 60 --json /tmp/sweep.json
    python benchmarks/planner_sweep.py --tiny --world-sizes 2 --steps 1  # the smoke test (figures mean nothing)

Model and data as zero_vs_fsdp2.py (docs/TARGETS.md's GPT, untied head, global batch 8,
AdamW, gpt_loss, the same seed for every configuration), and its harness: one job per world
size (shardfx.runtime.launch, gloo), every configuration built in the same processes and
stepped round-robin with the order rotating each step; `--warmup` untimed steps, one under
MemTracker, one under the collective counter, then `--steps` timed steps (barrier -> step ->
barrier, the median reported).

The sweep (SWEEP, 13 configurations) fixes every knob by hand: ZeRO stage 0-3, resharding,
bucket size, overlap and prefetch depth, recomputation. Before each job, in this process:

1. every sweep configuration is compiled (the compile driver, no runtime) and the planner's
   own figures are taken for it (shardfx.planner.predict: simulated step, peak per rank =
   memory timeline + Adam state), on this machine's profile (hardware "auto");
2. the memory limit is --memory-mib, or else the median of those simulated peaks, so that
   about half the sweep fits;
3. the planner runs (plan_step, Config(plan="auto", memory_limit=limit)), searching data
   parallelism only (keep tp_size, pp_size: the sweep measures no tp or pp layout; --full-search
   lets it choose those too); its compile time is reported.

The planner's chosen Config is then measured as one more row ("planner pick") beside the sweep.

Columns: predicted ms and sim peak MiB (the planner's figures), fits (sim peak <= limit),
median step ms (measured), vs best fit (median / the fastest measured sweep row that fits),
rank-0 peak MiB (MemTracker, as zero_vs_fsdp2.py measures it: not the same accounting as the
simulated peak), communication (what the step runs: zero_vs_fsdp2.plan_of).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zero_vs_fsdp2 as harness  # noqa: E402  (model, batches, the round-robin measurement loop)

import shardfx  # noqa: E402
from shardfx.driver import build_mesh, capture_step, compile_traced  # noqa: E402
from shardfx.graphs.cost_model import hardware  # noqa: E402
from shardfx.models import GPT, gpt_loss  # noqa: E402
from shardfx.planner import plan_step, predict  # noqa: E402
from shardfx.runtime.launch import launch  # noqa: E402

MiB = 2**20
PICK = "planner pick"
WITHIN = 0.10  # the target: the pick within 10% of the fastest measured configuration that fits

SWEEP: list[dict[str, Any]] = [
    {"zero_stage": 0, "bucket_mb": 0.0, "overlap": False},
    {"zero_stage": 0, "bucket_mb": 4.0, "overlap": True, "prefetch": 1},
    {"zero_stage": 0, "bucket_mb": 16.0, "overlap": True, "prefetch": 1, "recompute": "selective"},
    {"zero_stage": 1, "bucket_mb": 16.0, "overlap": True, "prefetch": 1},
    {"zero_stage": 2, "bucket_mb": 16.0, "overlap": True, "prefetch": 1},
    {"zero_stage": 2, "bucket_mb": 16.0, "overlap": True, "prefetch": 1, "recompute": "full"},
    {"zero_stage": 3, "bucket_mb": 0.0, "overlap": False},
    {"zero_stage": 3, "bucket_mb": 4.0, "overlap": True, "prefetch": 1},
    {"zero_stage": 3, "bucket_mb": 4.0, "overlap": True, "prefetch": 2},
    {"zero_stage": 3, "bucket_mb": 16.0, "overlap": True, "prefetch": 1},
    {"zero_stage": 3, "reshard_after_forward": False, "bucket_mb": 4.0, "overlap": True, "prefetch": 2},
    {"zero_stage": 3, "bucket_mb": 4.0, "overlap": True, "prefetch": 1, "recompute": "full"},
    {"zero_stage": 3, "reshard_after_forward": False, "bucket_mb": 4.0, "overlap": True, "prefetch": 2, "recompute": "full"},
]  # fmt: skip


def name_of(knobs: dict[str, Any]) -> str:
    zero = f"ZeRO-{knobs['zero_stage']}" + (" no reshard" if knobs.get("reshard_after_forward") is False else "")
    how = f"overlap p{knobs['prefetch']}" if knobs.get("overlap") else "no overlap"
    return f"{zero}, bucket {knobs['bucket_mb']:g}, {how}, recompute {knobs.get('recompute', 'none')}"


def example(opts: dict[str, Any]) -> tuple[Any, Any]:
    cfg = harness.model_config(opts)
    return cfg, harness.make_batches(opts, 1, cfg.vocab_size, cfg.seq_len)[0]


def prepare(opts: dict[str, Any], world: int) -> dict[str, Any]:
    """In this process: the planner's figures for every sweep row, the memory limit, the planner's pick."""
    cfg, batch = example(opts)
    torch.manual_seed(opts["seed"])
    model = GPT(cfg)
    hw = hardware("auto")
    base = shardfx.Config()
    traced = capture_step(model, batch, gpt_loss, base, build_mesh(base, world))
    predicted = {}
    for knobs in SWEEP:
        config = shardfx.Config(**knobs)
        predicted[name_of(knobs)] = predict(compile_traced(traced, config), config, hw)
    peaks = sorted(p["peak_bytes"] for p in predicted.values())
    limit = opts["memory_mib"] * MiB if opts["memory_mib"] else statistics.median(peaks)
    start = time.perf_counter()
    keep = () if opts["full_search"] else ("tp_size", "pp_size")
    plan = plan_step(model, batch, gpt_loss, shardfx.Config(plan="auto", memory_limit=limit), world, keep=keep)
    seconds = time.perf_counter() - start
    chosen = {k: v for k, v in vars(plan.config).items() if not k.startswith("deepspeed_")}
    return {"predicted": predicted, "limit": limit, "plan": plan, "plan_seconds": seconds, "chosen": chosen}


def worker(opts: dict[str, Any]) -> dict[str, Any]:
    """One rank: every sweep configuration and the planner's pick, stepped round-robin."""
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    cfg = harness.model_config(opts)
    batches = harness.make_batches(opts, opts["warmup"] + 2 + opts["steps"], cfg.vocab_size, cfg.seq_len)
    rows = {name_of(k): k for k in SWEEP}
    rows[PICK] = opts["chosen"]
    strategies = []
    for name, knobs in rows.items():
        start = time.perf_counter()
        torch.manual_seed(opts["seed"])
        engine = shardfx.compile_distributed(
            GPT(cfg),
            None,
            example_inputs=batches[0],
            loss_fn=gpt_loss,
            optimizer=lambda params: torch.optim.AdamW(params, lr=opts["lr"]),
            config=shardfx.Config(**{**knobs, "collective_timeout": float(opts["timeout"])}),
        )
        strategies.append(harness.Shardfx(name, engine, time.perf_counter() - start))
    times, memory, _ = harness.measure(strategies, batches, opts["warmup"], harness.peak_memory)
    out = {}
    for s in strategies:
        out[s.name] = {"times_s": times[s.name], "peak": memory[s.name]["Total"], "comm": harness.plan_of(s.engine)}
    return {"rank": dist.get_rank(), "threads": torch.get_num_threads(), "rows": out}


def summarize(prep: dict[str, Any], ranks: dict[int, dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    rows, limit, plan = ranks[0]["rows"], prep["limit"], prep["plan"]
    predicted = {
        **prep["predicted"],
        PICK: {"step_seconds": plan.chosen.step_seconds, "peak_bytes": plan.chosen.peak_bytes},
    }
    median = {name: statistics.median(r["times_s"]) * 1e3 for name, r in rows.items()}
    fits = {name: predicted[name]["peak_bytes"] <= limit for name in rows}
    sweep = [n for n in rows if n != PICK]
    fitting = [n for n in sweep if fits[n]]
    best = min(fitting, key=median.__getitem__) if fitting else None
    base = median[best] if best else float("nan")
    lines = [
        "| configuration | predicted ms | sim peak MiB | fits | median step ms | vs best fit | rank-0 peak MiB | communication |",
        "|---|---:|---:|:-:|---:|---:|---:|---|",
    ]
    for name in sweep + [PICK]:
        p = predicted[name]
        label = f"**{PICK}**: {plan.chosen.label}" if name == PICK else name
        lines.append(
            f"| {label} | {p['step_seconds'] * 1e3:.1f} | {p['peak_bytes'] / MiB:.1f} | {'yes' if fits[name] else 'no'} "
            f"| {median[name]:.1f} | {median[name] / base:.2f} | {rows[name]['peak'] / MiB:.1f} | {rows[name]['comm']} |"
        )
    ratio = median[PICK] / base
    order = sorted(sweep, key=lambda n: predicted[n]["step_seconds"])
    measured_order = sorted(sweep, key=median.__getitem__)
    lines += [
        "",
        f"memory limit {limit / MiB:.1f} MiB per rank (simulated peak); {len(fitting)} of {len(sweep)} sweep rows fit",
        f"planner: {plan.describe()}",
        f"planner compile time {prep['plan_seconds']:.1f} s ({len(plan.candidates)} candidates compiled, {plan.captures} captures)",
        f"fastest measured fit: {best} at {base:.1f} ms; the pick measures {median[PICK]:.1f} ms = {ratio:.2f}x "
        f"({'within' if ratio <= 1 + WITHIN else 'NOT within'} {WITHIN:.0%})",
        f"predicted order (fastest first): {', '.join(str(measured_order.index(n) + 1) for n in order)} "
        "(each row's measured rank)",
    ]
    record = {
        "limit_bytes": limit,
        "plan": plan.as_dict(),
        "plan_seconds": prep["plan_seconds"],
        "best_fit": best,
        "pick_vs_best_fit": ratio,
        "threads_per_rank": ranks[0]["threads"],
        "rows": {n: {**rows[n], "median_ms": median[n], "predicted": predicted[n], "fits": fits[n]} for n in rows},
    }
    return lines, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--world-sizes", default="2,4", help="comma-separated world sizes, one job each (default %(default)s)"
    )
    parser.add_argument("--steps", type=int, default=15, help="timed steps per configuration (default %(default)s)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps per configuration first (default %(default)s)"
    )
    parser.add_argument("--batch", type=int, default=8, help="global batch size (default %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model init (batches use seed+1)")
    parser.add_argument(
        "--memory-mib",
        type=float,
        default=None,
        help="the per-rank memory limit (default: the median simulated peak of the sweep)",
    )
    parser.add_argument("--full-search", action="store_true", help="let the planner choose tp and pp degrees too")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a rank waits in a collective")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the raw numbers here")
    parser.add_argument("--tiny", action="store_true", help="a 1-layer, 64-wide GPT: checks the script runs")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error(f"--warmup and --steps must be >= 1; got {args.warmup} and {args.steps}")
    world_sizes = [int(w) for w in args.world_sizes.split(",")]
    for w in world_sizes:
        if w < 1 or args.batch % w:
            parser.error(f"world size {w} must be >= 1 and divide the global batch {args.batch}")
    opts = {**vars(args), "tie_weights": False}
    print(
        f"GPT {'1x64, vocab 128, seq 32 (--tiny)' if args.tiny else '4x256, vocab 1024, seq 128'}, untied head; "
        f"global batch {args.batch}, AdamW lr {args.lr}; {len(SWEEP)} sweep configurations + the planner's pick; "
        f"{args.warmup} warm-up + 2 instrumented + {args.steps} timed steps; {os.cpu_count()} cores; "
        f"profile {hardware('auto').name} ({hardware('auto').source})"
    )
    report: dict[str, Any] = {"options": vars(args), "torch": torch.__version__, "world_sizes": {}}
    for world in world_sizes:
        start = time.perf_counter()
        prep = prepare(opts, world)
        ranks = launch(worker, ({**opts, "chosen": prep["chosen"]},), world, timeout=args.timeout)
        lines, record = summarize(prep, ranks)
        record["wall_s"] = time.perf_counter() - start
        report["world_sizes"][str(world)] = record
        print(
            f"\n### world size {world} ({record['threads_per_rank']} torch threads per rank, {record['wall_s']:.0f} s)\n"
        )
        print("\n".join(lines), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"raw numbers in {args.json}")


if __name__ == "__main__":
    main()
