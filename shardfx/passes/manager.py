"""The one place that runs passes: it checks the pipeline's contracts before
running anything, times each pass, verifies after each, records stats, dumps
the printed program after each, calls an observer after each, and turns a
failure into an error naming the pass, the passes before it and the node.

Contracts are data on each Pass (see check_pipeline): the facts it needs and
provides (passes/facts.py), the passes that must come before it when both are
in the pipeline, and whether the program is correct without it.
"""

from __future__ import annotations

import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from shardfx.config import Config
from shardfx.errors import PassError, ShardfxError
from shardfx.graphs import collectives
from shardfx.graphs.format import format_program
from shardfx.graphs.program import DistProgram
from shardfx.graphs.verify import verify
from shardfx.passes import facts


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
    """One step of the pipeline: its name, the bound function, why it runs, whether it keeps numerics,
    and its contract: what it needs and provides, what must run before it, whether it is required."""

    name: str
    fn: PassFn
    why: str
    exact: bool = True  # False: changes rounding (mixed precision, fusion); parity tests use a tolerance
    needs: tuple[str, ...] = ()  # facts (passes/facts.py) the capture or an earlier pass must provide
    provides: tuple[str, ...] = ()
    after: tuple[str, ...] = ()  # passes that must run before this one when both are in the pipeline
    required: bool = False  # the program is not the step the Config describes without it

    def bind(self, **options: Any) -> Pass:
        """This pass with keyword options bound (functools.partial), its contract unchanged."""
        return replace(self, fn=partial(self.fn, **options))


ObserverFn = Callable[[int, Pass, DistProgram, "PassRecord"], None]


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


def check_pipeline(passes: list[Pass], disabled: tuple[str, ...] = (), *, force_disable: bool = False) -> None:
    """Check the contracts of `passes` (with `disabled` skipped) before anything runs.

    A pass listed in another's `after` must come before it; every fact a pass needs must be
    provided by the capture or by an enabled pass before it; a required pass may be disabled
    only with force_disable (as bisect does), which also lets the passes after it run without
    the facts it would have provided. Raises ValueError naming both passes.
    """
    position = {p.name: i for i, p in enumerate(passes)}
    available = set(facts.CAPTURED)
    providers: dict[str, list[str]] = {}
    for p in passes:
        for fact in p.provides:
            providers.setdefault(fact, []).append(p.name)
    for i, p in enumerate(passes):
        if p.name in disabled:
            if p.required and not force_disable:
                raise ValueError(
                    f"disable_passes names {p.name!r}, which the program needs to be correct ({p.why}); "
                    "disabling it is refused unless asked for explicitly (Config(force_disable=True), "
                    "--force-disable)"
                )
            continue
        for before in p.after:
            if before in position and position[before] > i:
                raise ValueError(
                    f"pass {p.name!r} must run after {before!r}, but the pipeline puts {before!r} "
                    f"(#{position[before] + 1}) after it (#{i + 1})"
                )
        for need in p.needs:
            if need in available:
                continue
            sources = providers.get(need, [])
            if not sources:
                raise ValueError(
                    f"pass {p.name!r} needs {need}, which neither the capture nor a pass of this pipeline provides"
                )
            if force_disable and all(s in disabled for s in sources):
                continue  # asked for: the pass runs without what it needs (bisect finds out what breaks)
            source = sources[0]
            state = "is disabled" if source in disabled else f"runs after it (#{position[source] + 1} > #{i + 1})"
            raise ValueError(f"pass {p.name!r} needs {need}, which {source!r} provides, and {source!r} {state}")
        available.update(p.provides)


def run_passes(
    program: DistProgram,
    passes: list[Pass],
    ctx: PassContext,
    dump_dir: str | Path | None = None,
    *,
    observer: ObserverFn | None = None,
) -> tuple[DistProgram, list[PassRecord]]:
    """Run `passes` on `program` after check_pipeline; `observer(i, pass, program, record)` is called
    after each (disabled ones too, with the unchanged program): tools keep every stage from one run.
    The program is rewritten in place: an observer that keeps a stage copies it (clone_program)."""
    disabled = tuple(ctx.config.disable_passes)
    check_pipeline(passes, disabled, force_disable=ctx.config.force_disable)
    records: list[PassRecord] = []
    dump = Path(dump_dir) if dump_dir else None
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / "00_capture.txt").write_text(format_program(program, "after capture"))
    done: list[str] = []
    for i, p in enumerate(passes, start=1):
        if p.name in disabled:
            ctx.log(f"[{i}/{len(passes)}] {p.name}: disabled")
            records.append(PassRecord(p.name, 0.0, *program_stats(program), {}, skipped=True))
            if observer is not None:
                observer(i, p, program, records[-1])
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
        if observer is not None:
            observer(i, p, program, records[-1])
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
