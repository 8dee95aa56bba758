"""The one place that runs passes: it times each, verifies after each, records
stats, dumps the printed program after each, and turns a failure into an
error naming the pass, the passes before it and the node.
"""

from __future__ import annotations

import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardfx.config import Config
from shardfx.errors import PassError, ShardfxError
from shardfx.graphs import collectives
from shardfx.graphs.format import format_program
from shardfx.graphs.program import DistProgram
from shardfx.graphs.verify import verify


@dataclass
class PassContext:
    config: Config
    log: Callable[[str], None] = lambda line: None


@dataclass
class PassResult:
    program: DistProgram
    stats: dict[str, Any] = field(default_factory=dict)


PassFn = Callable[[DistProgram, PassContext], PassResult]


@dataclass(frozen=True)
class Pass:
    """One step of the pipeline: its name, the bound function, why it runs, and whether it keeps numerics."""

    name: str
    fn: PassFn
    why: str
    exact: bool = True  # False: changes rounding (mixed precision, fusion); parity tests use a tolerance


@dataclass
class PassRecord:
    name: str
    seconds: float
    nodes: int
    collectives: dict[str, int]
    comm_bytes: int
    stats: dict[str, Any]
    skipped: bool = False


def program_stats(program: DistProgram) -> tuple[int, dict[str, int], int]:
    """(node count, collectives by kind, bytes they move in the ZeRO paper's unit)."""
    kinds: Counter = Counter()
    volume = 0
    nodes = 0
    for node in program.graph.nodes:
        nodes += 1
        if collectives.is_collective(node):
            kind = collectives.kind(node)
            kinds[kind] += 1
            in_bytes = collectives.nbytes(node.args[0].meta["val"])
            volume += collectives.volume_bytes(kind, in_bytes, collectives.nbytes(node.meta["val"]))
    return nodes, dict(kinds), volume


def run_passes(
    program: DistProgram, passes: list[Pass], ctx: PassContext, dump_dir: str | Path | None = None
) -> tuple[DistProgram, list[PassRecord]]:
    records: list[PassRecord] = []
    dump = Path(dump_dir) if dump_dir else None
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / "00_capture.txt").write_text(format_program(program, "after capture"))
    done: list[str] = []
    for i, p in enumerate(passes, start=1):
        if p.name in ctx.config.disable_passes:
            ctx.log(f"[{i}/{len(passes)}] {p.name}: disabled")
            records.append(PassRecord(p.name, 0.0, *program_stats(program), {}, skipped=True))
            continue
        start = time.perf_counter()
        try:
            result = p.fn(program, ctx)
            program = result.program
            program.recompile()
            verify(program)
        except ShardfxError as exc:  # its message already names the node
            raise _pass_error(p.name, done, exc, None) from exc
        except Exception as exc:  # noqa: BLE001 - re-raised with the pass named
            raise _pass_error(p.name, done, exc, None) from exc
        seconds = time.perf_counter() - start
        nodes, kinds, volume = program_stats(program)
        records.append(PassRecord(p.name, seconds, nodes, kinds, volume, result.stats))
        ctx.log(f"[{i}/{len(passes)}] {p.name}: {seconds * 1e3:.1f} ms, {nodes} nodes, collectives {kinds or '{}'}")
        if dump is not None:
            (dump / f"{i:02d}_{p.name}.txt").write_text(format_program(program, f"after {p.name}"))
        done.append(p.name)
    return program, records


def _pass_error(name: str, done: list[str], exc: BaseException, node: Any) -> PassError:
    before = ", ".join(done) if done else "none"
    where = ""
    if not isinstance(exc, ShardfxError):
        frames = traceback.extract_tb(exc.__traceback__)
        if frames:
            f = frames[-1]
            where = f"\n  raised at {f.filename}:{f.lineno}"
    return PassError(f"pass {name!r} failed (passes before it: {before}): {type(exc).__name__}: {exc}{where}", node)
