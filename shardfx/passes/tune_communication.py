"""tune_communication: the cost model plans bucket sizes, overlap and prefetch depth.

What the Config leaves unset (bucket_mb, overlap, prefetch: None, the default)
is chosen here; what it sets is kept. Every candidate is built on a copy of the
program (bucket_collectives, then schedule_overlap) and simulated on the
hardware profile (shardfx.graphs.cost_model). Of those whose simulated peak,
in-flight buffers included, is under the memory cap, the ones within TOLERANCE
of the fastest are as fast as the model can tell; of them the smallest peak
wins (then the fastest): memory is not spent on a gain the model cannot see.
The whole table is in the pass stats, so a person can see why.

The search is kept small without losing a candidate: bucket caps that group
the collectives alike are one candidate (the smallest cap names it), each
grouping is bucketed once and its overlap variants are built from that copy,
and depths beyond the number of parameter gathers and of gradient reductions
are the same program.

Beside each depth above 1 runs the same depth bounded by the peak of depth 1
(schedule_overlap's peak_limit): a gather starts that deep, and a gradient
reduction is waited for that late, only where the live memory leaves room for
its buffer under depth 1's peak, so the forward's first blocks and the
backward's last ones are prefetched deep at depth 1's memory. An explicit
Config.prefetch is run as given, unbounded.

Needs: a sharding pass. Provides: what bucket_collectives and schedule_overlap provide.
"""

from __future__ import annotations

from typing import Any

from shardfx.graphs import collectives, meta
from shardfx.graphs.cost_model import hardware, simulate
from shardfx.graphs.program import DistProgram, clone_program
from shardfx.passes.bucket_collectives import bucket_collectives, buckets
from shardfx.passes.manager import PassContext, PassResult
from shardfx.passes.schedule_overlap import schedule_overlap

BUCKETS_MB = (0.0, 1.0, 4.0, 16.0, 64.0, 256.0)
DEPTHS = (1, 2, 3)
TOLERANCE = 0.02  # simulated step times this close are a tie


def _groupings(program: DistProgram, sizes: tuple[float, ...]) -> dict[float, tuple]:
    """The distinct ways the bucket caps group the collectives: smallest cap -> grouping."""
    seen: dict[tuple, float] = {}
    for mb in sizes:
        grouping = () if mb == 0 else tuple(tuple(n.name for n in g) for g in buckets(program, int(mb * 2**20)))
        if all(len(g) < 2 for g in grouping):
            grouping = ()  # nothing merged: the same program as no bucketing
        seen.setdefault(grouping, mb)
    return {mb: grouping for grouping, mb in seen.items()}


def _in_flight_bound(program: DistProgram) -> int:
    """The most collectives a depth can keep in flight: the parameter gathers or the gradient
    reductions, whichever are more (a deeper schedule is the same program)."""
    roles = [n.meta.get(meta.ROLE) for n in program.graph.nodes if collectives.is_collective(n)]
    return max(roles.count(meta.PARAM_GATHER), roles.count(meta.GRAD_SYNC), 1)


def tune_communication(
    program: DistProgram,
    ctx: PassContext,
    *,
    hw: str = "auto",
    memory_cap: float | None = None,
    bucket_mb: float | None = None,
    overlap: bool | None = None,
    prefetch: int | None = None,
) -> PassResult:
    profile = hardware(hw, ranks=program.mesh.world_size)
    sizes = BUCKETS_MB if bucket_mb is None else (float(bucket_mb),)
    table: list[dict[str, Any]] = []
    candidates: list[tuple[float, int, float, int, int]] = []  # (seconds, peak, MiB, depth, row) that fit
    programs: dict[int, DistProgram] = {}  # row -> its program (graphs only: vals are fake tensors)
    groupings = list(_groupings(program, sizes))
    for g, mb in enumerate(groupings):
        # copies are simulated, not run (lazy); the last candidate of all rewrites the program itself
        bucketed = program if g == len(groupings) - 1 else clone_program(program, lazy=True)
        if mb > 0:
            bucketed = bucket_collectives(bucketed, ctx, bucket_bytes=int(mb * 2**20)).program
        bound = _in_flight_bound(bucketed)
        depths = DEPTHS if prefetch is None else (prefetch,)
        depths = sorted({min(d, bound) for d in depths})
        schedules: list[tuple[int, bool] | None] = [None] if not overlap else []
        if overlap is not False:
            schedules += [(d, False) for d in depths]
            if prefetch is None:  # deeper only where the depth-1 peak leaves room
                schedules += [(d, True) for d in depths if d > 1]
        depth1_peak: int | None = None
        for s, schedule in enumerate(schedules):
            trial = bucketed
            depth, bounded = schedule or (None, False)
            if depth is not None:  # the grouping's last schedule may rewrite its copy, unless that is the best
                reuse = s == len(schedules) - 1 and all(p is not bucketed for p in programs.values())
                base = bucketed if reuse else clone_program(bucketed, lazy=True)
                limit = depth1_peak if bounded else None
                trial = schedule_overlap(base, ctx, depth=depth, peak_limit=limit).program
            sim = simulate(trial, profile)
            if depth == 1:
                depth1_peak = sim.peak_bytes
            fits = memory_cap is None or sim.peak_bytes <= memory_cap
            table.append(
                {
                    "bucket_mb": mb,
                    "overlap": depth is not None,
                    "prefetch": depth,
                    "within_depth1_peak": bounded,
                    "step_ms": round(sim.step_seconds * 1e3, 3),
                    "exposed_ms": round(sim.exposed_comm_seconds * 1e3, 3),
                    "peak_mib": round(sim.peak_bytes / 2**20, 2),
                    "peak_bytes": sim.peak_bytes,
                    "fits": fits,
                }
            )
            if fits:
                candidates.append((sim.step_seconds, sim.peak_bytes, mb, depth or 0, len(table) - 1))
                programs[len(table) - 1] = trial
    if not candidates:
        lowest = min(row["peak_bytes"] for row in table)
        # in bytes: a cap under 5 KiB and its peak both print as 0.00 MiB
        raise ValueError(
            f"no bucket size / prefetch depth keeps the peak under the memory cap (Config.comm_memory_cap="
            f"{memory_cap!r} bytes); the lowest simulated peak is {lowest} bytes: raise the cap or set it to None"
        )
    fastest = min(c[0] for c in candidates)
    tied = [c for c in candidates if c[0] <= fastest * (1 + TOLERANCE)]
    _, _, mb, depth, row = min(tied, key=lambda c: (c[1], c[0], c[2], c[3]))
    chosen = programs[row]
    chosen.recompile()
    stats = {
        "bucket_mb": mb,
        "overlap": bool(depth),
        "prefetch": depth or None,
        "within_depth1_peak": table[row]["within_depth1_peak"],
        "hardware": profile.name,
    }
    ctx.log(f"tune_communication: bucket {overlap_plan(stats)} ({profile.name} profile)")
    return PassResult(chosen, {**stats, "table": table})


def overlap_plan(stats: dict[str, Any]) -> str:
    """How a step communicates, from this pass's stats (or a Config's bucket_mb / overlap / prefetch):
    "4 MiB, overlap, prefetch 3 (within depth 1's peak)"."""
    within = " (within depth 1's peak)" if stats.get("within_depth1_peak") else ""
    how = f"overlap, prefetch {stats['prefetch']}{within}" if stats["overlap"] else "no overlap"
    return f"{stats['bucket_mb'] or 0.0:g} MiB, {how}"
