"""tune_communication: let the cost model choose the bucket size and prefetch depth.

Tries every (bucket size, prefetch depth) of a small grid on copies of the
program (bucket_collectives then schedule_overlap), simulates each on the
configured hardware profile (shardfx.graphs.cost_model), and keeps the fastest
whose simulated peak memory, in-flight buffers included, is under the memory
cap. Ties go to the smaller peak. The choice and the whole table are in the
pass stats, so a person can see why.

Needs: a sharding pass. Provides: what bucket_collectives and schedule_overlap provide.
"""

from __future__ import annotations

from typing import Any

from shardfx.graphs.cost_model import hardware, simulate
from shardfx.graphs.program import DistProgram, clone_program
from shardfx.passes.bucket_collectives import bucket_collectives
from shardfx.passes.manager import PassContext, PassResult
from shardfx.passes.schedule_overlap import schedule_overlap

BUCKETS_MB = (0.0, 1.0, 4.0, 16.0, 64.0)
DEPTHS = (1, 2, 3)


def _variant(program: DistProgram, ctx: PassContext, bucket_mb: float, depth: int) -> DistProgram:
    trial = clone_program(program)
    if bucket_mb > 0:
        trial = bucket_collectives(trial, ctx, bucket_bytes=int(bucket_mb * 2**20)).program
    trial = schedule_overlap(trial, ctx, depth=depth).program
    trial.recompile()
    return trial


def tune_communication(
    program: DistProgram, ctx: PassContext, *, hw: str = "cpu", memory_cap: float | None = None
) -> PassResult:
    profile = hardware(hw)
    table: list[dict[str, Any]] = []
    best: tuple[float, int, float, int] | None = None
    for bucket_mb in BUCKETS_MB:
        for depth in DEPTHS:
            sim = simulate(_variant(program, ctx, bucket_mb, depth), profile)
            fits = memory_cap is None or sim.peak_bytes <= memory_cap
            table.append(
                {
                    "bucket_mb": bucket_mb,
                    "prefetch": depth,
                    "step_ms": round(sim.step_seconds * 1e3, 3),
                    "exposed_ms": round(sim.exposed_comm_seconds * 1e3, 3),
                    "peak_mib": round(sim.peak_bytes / 2**20, 2),
                    "peak_bytes": sim.peak_bytes,
                    "fits": fits,
                }
            )
            key = (sim.step_seconds, sim.peak_bytes, bucket_mb, depth)
            if fits and (best is None or key < best):
                best = key
    if best is None:
        lowest = min(row["peak_mib"] for row in table)
        raise ValueError(
            f"no bucket size / prefetch depth keeps the peak under the memory cap {memory_cap / 2**20:.2f} MiB; "
            f"the lowest is {lowest:.2f} MiB"
        )
    _, _, bucket_mb, depth = best
    chosen = _variant(program, ctx, bucket_mb, depth)
    ctx.log(f"tune_communication: bucket {bucket_mb:g} MiB, prefetch {depth} ({hw} profile)")
    return PassResult(chosen, {"bucket_mb": bucket_mb, "prefetch": depth, "hardware": hw, "table": table})
