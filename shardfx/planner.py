"""The planner: Config(plan="auto", memory_limit=...) becomes the fastest simulated Config that fits.

    plan = plan_step(model, batch, loss_fn, Config(plan="auto", memory_limit=80e9), world_size=8)
    plan.config                 # the Config it chose (plan=None): compile it as any other
    plan.compiled               # its programs, already compiled (compile_distributed runs these)
    print(plan.table())         # the chosen candidate and the next best, with predicted time and peak

What it searches (a field the Config sets away from its default is kept, not searched):
the layout (tp_size and pp_size dividing the world size; tp only where the model's
tensor-parallel plan compiles, pp only where the model cuts into that many stages),
zero_stage 0-3, reshard_after_forward for ZeRO-3, and recompute none / selective / full.
Bucket sizes, overlap and prefetch depth are tune_communication's choice inside every
compile (passes/tune_communication.py), under what memory the limit leaves them.

How a candidate is judged: every program the step needs is compiled through the compile
driver (no runtime) and simulated by the cost model on Config.hardware's profile
(graphs/cost_model.py). Its step time is the sum over the step's micro-batches; under a
pipeline, the slowest stage's micro-batches plus the (P-1)/(M+P-1) bubble of a synchronous
schedule. Its peak per rank is the largest program's memory timeline (parameters,
gradients, activations, gathered copies; under a pipeline, the activations of every
micro-batch the schedule keeps alive) plus the optimizer state beside the program:
Adam's two fp32 moments of every parameter element the rank updates (8 bytes each).
Of those whose peak is at most memory_limit, the fastest wins (memory under the limit buys
nothing; an equal time goes to the smaller peak).

What keeps it affordable:
- one capture per mesh shape (the capture depends only on the rank's batch and the
  mesh); every candidate compiles a copy of it (driver.compile_traced);
- recomputation only adds compute, so it is tried only for layouts whose plain step does
  not fit, in the order none -> selective -> full, stopping at the first that fits, and
  only while the plain step (a lower bound of its time) is faster than the best found;
- a layout's first candidate gives its compute time, which no candidate of the layout
  beats (the sharding passes add communication, not compute): once that is slower than
  the best found, the layout's other candidates are not compiled;
- with one data-parallel rank every ZeRO stage is the same program: only stage 0 runs;
- a layout whose first candidate does not compile (a tensor-parallel plan or a pipeline
  cut the model does not take) is not tried further;
- a candidate whose peak misses the limit only by what tune_communication's buffers add
  is compiled once more with comm_memory_cap set to what the limit leaves them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from shardfx.config import Config
from shardfx.driver import Compiled, Traced, build_mesh, capture_step, compile_traced
from shardfx.errors import ShardfxError
from shardfx.graphs.analysis import tensor_bytes
from shardfx.graphs.collectives import RECV, SEND
from shardfx.graphs.cost_model import Hardware, hardware, simulate
from shardfx.graphs.phases import split_phases
from shardfx.graphs.pp_schedule import alive_by_stage, stage_key
from shardfx.graphs.signature import PARAM
from shardfx.passes.pipeline import schedule
from shardfx.passes.tune_communication import overlap_plan

AUTO = "auto"
OPTIMIZER_BYTES = 8  # per parameter element a rank updates: Adam's exp_avg and exp_avg_sq in fp32
RECOMPUTE_ORDER = ("none", "selective", "full")  # each recomputes a superset of the one before
# The fields the planner chooses; a Config that sets one away from its default keeps it.
SEARCHED = ("tp_size", "pp_size", "zero_stage", "reshard_after_forward", "recompute")
_DEFAULTS = Config()


@dataclass
class Candidate:
    """One configuration the planner compiled and simulated (or could not compile)."""

    config: Config  # plan=None; the searched fields fixed, communication as the Config left it
    step_seconds: float = float("inf")  # simulated, one optimizer step
    compute_seconds: float = float("inf")  # of it, compute alone: a lower bound of the layout's steps
    peak_bytes: int = 0  # per rank: the program's memory timeline + the optimizer state
    optimizer_bytes: int = 0
    fits: bool = False
    comm: str = ""  # what tune_communication chose (or the Config's settings)
    note: str = ""  # why it did not compile, or was compiled again under a communication cap
    compile_seconds: float = 0.0
    compiled: Compiled | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return describe(self.config)

    def row(self) -> dict[str, Any]:
        return {
            "config": self.label,
            "comm": self.comm,
            "step_ms": round(self.step_seconds * 1e3, 3) if self.step_seconds != float("inf") else None,
            "peak_bytes": self.peak_bytes,
            "optimizer_bytes": self.optimizer_bytes,
            "fits": self.fits,
            "note": self.note,
        }


@dataclass
class Plan:
    chosen: Candidate
    candidates: list[Candidate]  # every one compiled, the fastest first
    memory_limit: float | None
    hardware: str
    world_size: int
    seconds: float  # the whole search: captures and compiles
    captures: int
    skipped: list[str]  # candidates the pruning did not compile, and why

    @property
    def config(self) -> Config:
        return self.chosen.config

    @property
    def compiled(self) -> Compiled:
        assert self.chosen.compiled is not None
        return self.chosen.compiled

    def describe(self) -> str:
        """One line: what runs, its predicted step and peak, and what the search cost."""
        c = self.chosen
        limit = "no memory limit" if self.memory_limit is None else f"limit {_mib(self.memory_limit)}"
        return (
            f"plan: {c.label}; {c.comm}: predicted step {c.step_seconds * 1e3:.2f} ms, peak {_mib(c.peak_bytes)} "
            f"per rank ({limit}, {self.hardware} profile); {len(self.candidates)} candidates compiled, "
            f"{len(self.skipped)} pruned, {self.seconds:.1f} s"
        )

    def table(self, alternatives: int = 5) -> str:
        """The chosen plan and the next `alternatives` best that fit, then the fastest that do not fit."""
        fitting = [c for c in self.candidates if c.fits]
        shown = [self.chosen] + [c for c in fitting if c is not self.chosen][:alternatives]
        over = [c for c in self.candidates if not c.fits and c.step_seconds != float("inf")][:2]
        width = max(len(c.label) for c in shown + over)
        cwidth = max(len(c.comm) for c in shown + over)
        lines = [
            f"{'':2}{'configuration':<{width}}  {'communication':<{cwidth}}  {'step ms':>9}  {'vs best':>7}  {'peak':>11}"
        ]
        best = self.chosen.step_seconds
        for i, c in enumerate(shown + over):
            mark = "->" if i == 0 else ("  " if c.fits else " x")
            lines.append(
                f"{mark}{c.label:<{width}}  {c.comm:<{cwidth}}  {c.step_seconds * 1e3:>9.2f}  "
                f"{c.step_seconds / best:>7.2f}  {_mib(c.peak_bytes):>11}"
            )
        limit = "none" if self.memory_limit is None else _mib(self.memory_limit)
        lines.append(
            f"-> the plan; x over the memory limit ({limit}). peak: per rank, the program's memory timeline "
            f"+ optimizer state ({OPTIMIZER_BYTES} bytes a parameter element); step: simulated on {self.hardware}"
        )
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen.row(),
            "config": {k: getattr(self.config, k) for k in (*SEARCHED, "bucket_mb", "overlap", "prefetch")},
            "memory_limit": self.memory_limit,
            "hardware": self.hardware,
            "world_size": self.world_size,
            "seconds": round(self.seconds, 3),
            "captures": self.captures,
            "candidates": [c.row() for c in self.candidates],
            "skipped": list(self.skipped),
        }


def describe(config: Config) -> str:
    """A candidate's searched fields, short: 'pp 2 (M=4) x tp 2, ZeRO-3 no reshard, recompute full'."""
    layout = []
    if config.pp_size > 1:
        layout.append(f"pp {config.pp_size} (M={config.pp_microbatches})")
    if config.tp_size > 1:
        layout.append(f"tp {config.tp_size}")
    zero = f"ZeRO-{config.zero_stage}" + (
        " no reshard" if config.zero_stage == 3 and not config.reshard_after_forward else ""
    )
    return ", ".join([" x ".join(layout)] * bool(layout) + [zero, f"recompute {config.recompute}"])


def check_explicit(config: Config, keep: Sequence[str] = ()) -> list[str]:
    """The searched fields the planner keeps at the Config's value: those it sets away from their
    defaults, and those named in `keep` (a default value cannot be told from one given)."""
    unknown = sorted(set(keep) - set(SEARCHED))
    if unknown:
        raise ValueError(f"keep={unknown}: not fields the planner searches; it searches {list(SEARCHED)}")
    return [k for k in SEARCHED if getattr(config, k) != getattr(_DEFAULTS, k) or k in keep]


def layouts(config: Config, world_size: int, kept: Sequence[str] = ()) -> list[tuple[int, int]]:
    """(tp, pp) pairs to try: both dividing the world size (the Config's own where they are kept)."""
    divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
    tps = [config.tp_size] if "tp_size" in kept else divisors
    pps = [config.pp_size] if "pp_size" in kept else divisors
    return [(tp, pp) for pp in pps for tp in tps if world_size % (tp * pp) == 0]


def plan_step(
    model: nn.Module,
    batch: Sequence[torch.Tensor],
    loss_fn: Callable[..., torch.Tensor] | None,
    config: Config,
    world_size: int,
    *,
    log: Callable[[str], None] | None = None,
    keep: Sequence[str] = (),
) -> Plan:
    """Search the Configs `config` leaves open (see the module docstring) and return the plan.
    `keep`: searched fields to hold at the Config's value even where it is the default
    (e.g. ("tp_size", "pp_size"): data parallelism only). `log` sees one line per candidate."""
    if config.plan != AUTO:
        raise ValueError(f"plan_step plans a Config(plan='auto'); got plan={config.plan!r}")
    return _Search(model, tuple(batch), loss_fn, config, world_size, log, keep).run()


class _Search:
    def __init__(
        self,
        model: nn.Module,
        batch: tuple[torch.Tensor, ...],
        loss_fn: Callable[..., torch.Tensor] | None,
        config: Config,
        world_size: int,
        log: Callable[[str], None] | None,
        keep: Sequence[str],
    ) -> None:
        self.model, self.batch, self.loss_fn, self.world_size = model, batch, loss_fn, world_size
        self.limit = config.memory_limit
        self.base = config.replace(plan=None, memory_limit=None)
        self.explicit = set(check_explicit(config, keep))
        self.hw: Hardware = hardware(config.hardware, ranks=world_size)
        self.log = log or (lambda line: None)
        self.traces: dict[tuple[int, int, int], Traced | Exception] = {}
        self.candidates: list[Candidate] = []
        self.skipped: list[str] = []
        self.best: Candidate | None = None

    def run(self) -> Plan:
        start = time.perf_counter()
        plain: list[Candidate] = []
        for tp, pp in layouts(self.base, self.world_size, tuple(self.explicit)):
            bound = None  # the layout's compute time (its first candidate's): no candidate of it runs faster
            for knobs in self._sharding(tp, pp):
                try:
                    config = self.base.replace(**knobs)
                except ValueError as exc:  # e.g. a pipeline beside grad_accum_steps, or sequence_parallel at tp 1
                    self.skipped.append(f"{knobs}: the Config refuses it: {exc}")
                    continue
                if bound == float("inf"):
                    self.skipped.append(f"{describe(config)}: the layout's first candidate does not compile")
                    continue
                if bound is not None and self.best is not None and bound >= self.best.step_seconds:
                    self.skipped.append(
                        f"{describe(config)}: the layout's compute alone ({bound * 1e3:.2f} ms) is slower "
                        "than the best fit"
                    )
                    continue
                candidate = self._try({}, config)
                plain.append(candidate)
                bound = candidate.compute_seconds if bound is None else min(bound, candidate.compute_seconds)
        if "recompute" not in self.explicit:
            self._recompute([c for c in plain if not c.fits and c.step_seconds != float("inf")])
        compiled = [c for c in self.candidates if c.step_seconds != float("inf")]
        if not compiled:
            notes = "; ".join(f"{c.label}: {c.note}" for c in self.candidates[:4])
            raise ValueError(f"Config(plan='auto'): no candidate compiled for world size {self.world_size}: {notes}")
        if self.best is None:
            low = min(compiled, key=lambda c: c.peak_bytes)
            raise ValueError(
                f"Config(plan='auto', memory_limit={self.limit:.0f}) ({_mib(self.limit)} per rank): no configuration "
                f"fits; the smallest simulated peak found is {_mib(low.peak_bytes)} ({low.label}; {low.comm}), "
                f"over {len(compiled)} candidates at world size {self.world_size}: raise memory_limit to at least "
                f"{low.peak_bytes}, or add ranks"
            )
        self.candidates.sort(key=lambda c: (not c.fits, c.step_seconds, c.peak_bytes))
        traces = sum(1 for t in self.traces.values() if isinstance(t, Traced))
        plan = Plan(
            self.best,
            self.candidates,
            self.limit,
            self.hw.name,
            self.world_size,
            time.perf_counter() - start,
            traces,
            self.skipped,
        )
        for c in self.candidates:
            if c is not self.best:
                c.compiled = None  # only the chosen one's programs are kept
        return plan

    def _sharding(self, tp: int, pp: int) -> list[dict[str, Any]]:
        """The ZeRO stage / resharding choices of one layout."""
        dp = self.world_size // (tp * pp)
        layout: dict[str, Any] = {"tp_size": tp, "pp_size": pp}
        if pp > 1 and "pp_size" not in self.explicit:
            layout.update(self._pipeline(pp, dp))
            if layout.get("pp_microbatches") is None:
                self.skipped.append(f"pp {pp}: the batch does not split into {pp} micro-batches per rank")
                return []
        if "zero_stage" in self.explicit:
            stages = [self.base.zero_stage]
        else:
            stages = [0, 1, 2, 3] if dp > 1 else [0]
            if dp == 1:
                self.skipped.append(f"tp {tp} x pp {pp}: ZeRO-1..3 on one dp rank: the same program as ZeRO-0")
        out = []
        for stage in stages:
            if stage == 3 and "reshard_after_forward" not in self.explicit:
                out += [{**layout, "zero_stage": 3, "reshard_after_forward": r} for r in (True, False)]
            else:
                out.append({**layout, "zero_stage": stage, "reshard_after_forward": self.base.reshard_after_forward})
        return out

    def _pipeline(self, pp: int, dp: int) -> dict[str, Any]:
        """A pipeline's micro-batches: 2 x pp where the batch allows (a bubble of (P-1)/(3P-1)), else pp."""
        if self.base.pp_size > 1:
            return {}
        rows = self.batch[0].shape[0]
        for m in (2 * pp, pp):
            if rows % (dp * m) == 0:
                return {"pp_microbatches": m, "pp_schedule": "1f1b"}
        return {"pp_microbatches": None}

    def _recompute(self, over: list[Candidate]) -> None:
        """Recompute for the plain candidates over the limit, the fastest first, while they can still win."""
        for plain in sorted(over, key=lambda c: c.step_seconds):
            for level in RECOMPUTE_ORDER[RECOMPUTE_ORDER.index(plain.config.recompute) + 1 :]:
                if self.best is not None and plain.step_seconds >= self.best.step_seconds:
                    self.skipped.append(
                        f"{describe(plain.config.replace(recompute=level))}: its plain step "
                        f"({plain.step_seconds * 1e3:.2f} ms) is already slower than the best fit"
                    )
                    continue
                if self._try({"recompute": level}, plain.config).fits:
                    break  # the next level recomputes more: slower, and this one fits already

    def _try(self, knobs: dict[str, Any], base: Config | None = None) -> Candidate:
        config = (base or self.base).replace(**knobs)
        candidate = self._evaluate(config)
        if self.limit is not None and not candidate.fits and candidate.compiled is not None:
            room = self.limit - candidate.optimizer_bytes
            if _comm_fits(candidate.compiled, room) and self.base.comm_memory_cap is None:
                capped = self._evaluate(config.replace(comm_memory_cap=float(room)))
                if capped.fits:
                    capped.note = f"communication capped at {_mib(room)}"
                    self.candidates.remove(candidate)
                    candidate = capped
                else:
                    self.candidates.remove(capped)
        if candidate.fits and (self.best is None or _better(candidate, self.best)):
            self.best = candidate
        return candidate

    def _evaluate(self, config: Config) -> Candidate:
        candidate = Candidate(config)
        self.candidates.append(candidate)
        start = time.perf_counter()
        try:
            traced = self._trace(config)
            compiled = compile_traced(traced, config)
        except (ValueError, TypeError, NotImplementedError, ShardfxError) as exc:
            candidate.note = f"does not compile: {' '.join(str(exc).split())[:200]}"
            candidate.compile_seconds = time.perf_counter() - start
            self.log(f"planner: {candidate.label}: {candidate.note}")
            return candidate
        candidate.compile_seconds = time.perf_counter() - start
        candidate.compiled = compiled
        times, program_peak, candidate.optimizer_bytes = _measure(compiled, config, self.hw)
        candidate.step_seconds, candidate.compute_seconds = times
        candidate.peak_bytes = program_peak + candidate.optimizer_bytes
        candidate.fits = self.limit is None or candidate.peak_bytes <= self.limit
        candidate.comm = _comm(compiled, config)
        self.log(
            f"planner: {candidate.label}; {candidate.comm}: {candidate.step_seconds * 1e3:.2f} ms, "
            f"peak {_mib(candidate.peak_bytes)}{'' if candidate.fits else ' (over the limit)'}"
        )
        return candidate

    def _trace(self, config: Config) -> Traced:
        """One capture per mesh shape and micro-batch: every candidate on it compiles a copy."""
        key = (config.tp_size, config.pp_size, config.pp_microbatches if config.pp_size > 1 else 1)
        if key not in self.traces:
            try:
                mesh = build_mesh(config, self.world_size)
                self.traces[key] = capture_step(self.model, self.batch, self.loss_fn, config, mesh)
            except (ValueError, TypeError, NotImplementedError, ShardfxError) as exc:
                self.traces[key] = exc
        traced = self.traces[key]
        if isinstance(traced, Exception):
            raise traced
        return traced


def _better(a: Candidate, b: Candidate) -> bool:
    """a beats b: faster, or as fast with a smaller peak."""
    return (a.step_seconds, a.peak_bytes) < (b.step_seconds, b.peak_bytes)


def predict(compiled: Compiled, config: Config, hw: Hardware) -> dict[str, float]:
    """The planner's figures for any compiled step: step and compute seconds, peak and optimizer bytes."""
    (step, compute), program_peak, optimizer = _measure(compiled, config, hw)
    return {
        "step_seconds": step,
        "compute_seconds": compute,
        "peak_bytes": program_peak + optimizer,
        "optimizer_bytes": optimizer,
    }


def _measure(compiled: Compiled, config: Config, hw: Hardware) -> tuple[tuple[float, float], int, int]:
    """((simulated step seconds, of them compute), the largest program peak, optimizer bytes) of a step."""
    micro = schedule(config).micro_batches
    sims = {name: simulate(p, hw) for name, p in compiled.programs.items()}
    optimizer = max(_optimizer_bytes(p) for p in compiled.programs.values())
    if config.pp_size == 1:
        # the optimizer updates once, after the last micro-batch's program
        step = sum(sims[v].step_seconds for v in micro) + sims[micro[-1]].optimizer_seconds
        times = (step, sum(sims[v].compute_seconds for v in micro))
        return times, max(s.peak_bytes for s in sims.values()), optimizer
    # A pipeline: every stage runs its micro-batches; the slowest sets the pace, and a synchronous
    # schedule adds (P-1) micro-batch times of fill and drain (the (P-1)/(M+P-1) bubble).
    alive = alive_by_stage(config.pp_schedule, config.pp_size, config.pp_microbatches, config.pp_chunks)
    stage_seconds, stage_compute, updates, peak = [], [], [], 0
    for s in range(config.pp_stages):
        p2p = sum(_p2p_seconds(compiled.programs[stage_key(s, v)], hw) for v in micro)
        stage_seconds.append(sum(sims[stage_key(s, v)].step_seconds for v in micro) + p2p)
        updates.append(sims[stage_key(s, micro[-1])].optimizer_seconds)
        stage_compute.append(sum(sims[stage_key(s, v)].compute_seconds for v in micro))
        for v in set(micro):
            program = compiled.programs[stage_key(s, v)]
            # the timeline holds one micro-batch's activations; the schedule keeps alive[s] of them
            kept = split_phases(program).saved_bytes * (alive[s % config.pp_size] - 1)
            peak = max(peak, sims[stage_key(s, v)].peak_bytes + kept)
    bubble = 1 + (config.pp_size - 1) / len(micro)
    # every stage updates its own parameters after its last backward, outside the bubble
    step = max(seconds * bubble + update for seconds, update in zip(stage_seconds, updates))
    return (step, max(stage_compute) * bubble), peak, optimizer


def _p2p_seconds(program: Any, hw: Hardware) -> float:
    """The sends and receives of a stage program, which the cost model prices as plain ops: each
    one waits for its peer, alpha + bytes / link bandwidth (the whole tensor crosses the link)."""
    hw = hw.at(program.mesh.world_size)
    seconds = 0.0
    for node in program.graph.nodes:
        if node.target is SEND:
            seconds += hw.alpha + tensor_bytes(node.args[0].meta["val"]) / hw.link_bw
        elif node.target is RECV:
            seconds += hw.alpha + tensor_bytes(node.meta["val"]) / hw.link_bw
    return seconds


def _optimizer_bytes(program: Any) -> int:
    """Adam's state of the trainable parameter elements this rank updates (its shards under ZeRO)."""
    trainable = {s.name for s in program.signature.params(trainable_only=True)}
    elements = sum(
        n.meta["val"].numel()
        for spec, n in zip(program.signature.inputs, program.placeholders())
        if spec.role == PARAM and spec.name in trainable
    )
    return elements * OPTIMIZER_BYTES


def _comm_fits(compiled: Compiled, room: float) -> bool:
    """Some plan tune_communication weighed (in every program) keeps the peak within `room` bytes."""
    tables = [
        r.stats["table"] for records in compiled.records.values() for r in records if r.name == "tune_communication"
    ]
    return bool(tables) and all(any(row["peak_bytes"] <= room for row in table) for table in tables)


def _comm(compiled: Compiled, config: Config) -> str:
    """What the step's last program communicates with: tune_communication's choice or the Config's."""
    records = compiled.records[compiled.last]
    stats = next((r.stats for r in records if r.name == "tune_communication"), None)
    if stats is None:
        stats = {"bucket_mb": config.bucket_mb, "overlap": config.overlap, "prefetch": config.prefetch}
    return f"bucket {overlap_plan(stats)}"


def _mib(nbytes: float) -> str:
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.2f} GiB"
    return f"{nbytes / 2**20:.1f} MiB"
