"""A measured step: every node of every rank's program timed, as a Chrome / Perfetto trace.

The cost model predicts a step (graphs/cost_model.trace); this measures one in the same layout,
so that prediction and measurement open side by side in ui.perfetto.dev. `engine.trace_step(*batch)`
runs one optimizer step (every micro-batch of it) as train_step does, except that each rank runs
its program node by node through TimedInterpreter: an fx.Interpreter over the same graph, calling
the same ops on the same arguments in the same order, so the step's results are bitwise those of
the generated code (tests/runtime/test_step_trace.py checks it). Per rank it records

- compute track (tid 0): every compute node, named by its op, with the node, its module and
  phase in the args; "exposed" slices (category "exposed", as in the simulated trace) for the
  time compute sits in communication: a synchronous collective, a `*_start` while it issues
  (the local runtime runs the whole collective there) and a `wait`;
- communication track (tid 1): every collective; a `*_start` from its issue until its wait
  returned, an upper bound of its completion (nothing says when the data landed earlier; the
  event's args say so), a synchronous one for the time it took;
- optimizer track (tid 2): optimizer.step, which runs outside the program and the cost model.

Timestamps count from a barrier just before the step on every rank (the local runtime's ranks
are threads of one process: one clock, one origin, taken before they start; they also share the
GIL, so judge overlap by the processes runtime's trace). On CUDA every node ends with the compute
stream synchronised, so a node's time is its kernels', not their launch; NCCL's stream is left
alone, so an async collective still overlaps compute until its wait. Interpreting costs a few
microseconds of Python a node more than the generated code: tiny ops on a CPU look slower here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx

from shardfx.graphs import collectives, cost_model, meta
from shardfx.graphs.format import op_name
from shardfx.graphs.program import DistProgram

COMPUTE_TRACK, COMM_TRACK = cost_model.COMPUTE_TRACK, cost_model.COMM_TRACK
OPTIMIZER_TRACK = 2
TRACKS = {COMPUTE_TRACK: "compute", COMM_TRACK: "communication", OPTIMIZER_TRACK: "optimizer"}
WAIT_END = "when its wait returned: an upper bound of when the collective completed"


class Timeline:
    """One rank's measured events of a step, Chrome trace events in microseconds since `origin`
    (a time.perf_counter reading). `sync`: what makes a node's work finished before its end is read
    (the CUDA compute stream's synchronize; None on a CPU)."""

    def __init__(self, rank: int, origin: float, sync: Callable[[], None] | None = None) -> None:
        self.rank = rank
        self.origin = origin
        self.sync = sync
        self.events: list[dict[str, Any]] = []
        self.programs: list[DistProgram] = []  # the program of every micro-batch run, in order
        self._issued: dict[fx.Node, float] = {}  # `*_start` nodes whose wait has not run: issue time

    def begin_run(self, program: DistProgram) -> None:
        """A program (one micro-batch) starts on this rank."""
        self.programs.append(program)
        self._issued = {}

    def end_run(self) -> None:
        """Close the collectives no wait of this program finished (none should be left: verify pairs them)."""
        end = time.perf_counter()
        for start, issued in self._issued.items():
            self._slice(COMM_TRACK, collectives.kind(start), "collective", issued, end, _where(start), "no wait ran")
        self._issued = {}

    def node(self, node: fx.Node, begin: float, end: float) -> None:
        """Record one call_function node that ran from `begin` to `end` (perf_counter seconds)."""
        where = _where(node)
        if collectives.is_start(node):
            self._issued[node] = begin
            self._slice(COMPUTE_TRACK, f"{collectives.kind(node)} (issue)", "exposed", begin, end, where)
        elif collectives.is_wait(node):
            self._slice(COMPUTE_TRACK, "wait", "exposed", begin, end, where)
            start = node.args[0]
            issued = self._issued.pop(start, None) if isinstance(start, fx.Node) else None
            if issued is not None:
                assert isinstance(start, fx.Node)
                args = {**_where(start), "wait": node.name}
                self._slice(COMM_TRACK, collectives.kind(start), "collective", issued, end, args, WAIT_END)
        elif collectives.is_collective(node):
            kind = collectives.kind(node)
            self._slice(COMM_TRACK, kind, "collective", begin, end, where, "when it returned (synchronous)")
            self._slice(COMPUTE_TRACK, f"{kind} (synchronous)", "exposed", begin, end, where)
        else:
            self._slice(COMPUTE_TRACK, op_name(node.target), "compute", begin, end, where)

    @contextmanager
    def span(self, track: int, name: str, category: str) -> Iterator[None]:
        """Time the block as one slice (the optimizer step, outside the program)."""
        begin = time.perf_counter()
        yield
        if self.sync is not None:
            self.sync()
        self._slice(track, name, category, begin, time.perf_counter(), {})

    def _slice(
        self, track: int, name: str, category: str, begin: float, end: float, args: dict[str, Any], ends: str = ""
    ) -> None:
        args = {**args, "micro_batch": len(self.programs) - 1}
        if ends:
            args["end"] = ends
        self.events.append(
            {
                "name": name,
                "cat": category,
                "ph": "X",
                "pid": self.rank,
                "tid": track,
                "ts": (begin - self.origin) * 1e6,
                "dur": (end - begin) * 1e6,
                "args": args,
            }
        )


def _where(node: fx.Node) -> dict[str, Any]:
    return {"node": node.name, "module": node.meta.get(meta.MODULE) or "", "phase": node.meta.get(meta.PHASE, "")}


class TimedInterpreter(fx.Interpreter):
    """Runs a graph node by node, timing every call_function node into `timeline`. `current` is the
    node running (or the one that raised), for executor.call_graph's error."""

    def __init__(self, gm: fx.GraphModule, timeline: Timeline) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # call_graph names the node; torch's note would repeat the message
        self.timeline = timeline
        self.current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        if n.op != "call_function":
            return super().run_node(n)
        begin = time.perf_counter()
        out = super().run_node(n)
        if self.timeline.sync is not None:
            self.timeline.sync()
        self.timeline.node(n, begin, time.perf_counter())
        return out


def begin_step(ranks: list[int], distributed: bool, device: torch.device) -> dict[int, Timeline]:
    """A timeline for every rank this process holds, all starting now: after a barrier on a distributed
    job (each rank's clock starts as it leaves it), at one reading of this process's clock otherwise."""
    sync = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the steps before have finished
        stream = torch.cuda.current_stream(device)
        sync = stream.synchronize
    if distributed:
        import torch.distributed as dist

        dist.barrier()
    origin = time.perf_counter()
    return {rank: Timeline(rank, origin, sync) for rank in ranks}


def chrome_trace(
    timelines: dict[int, Timeline],
    *,
    world_size: int,
    distributed: bool,
    hardware: cost_model.Hardware | None,
    other: dict[str, Any],
) -> dict[str, Any]:
    """The measured step of every rank (pid R, "rank R (measured)") and, with a `hardware` profile, the
    cost model's simulated step of the same programs (pid world_size + R, "rank R (simulated)"), each
    rank's two next to each other. On a distributed job every rank's events are gathered to every rank
    (a collective). `other`: more otherData (the step, its loss)."""
    local = [e for r in sorted(timelines) for e in timelines[r].events]
    if distributed:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, local)
        measured = [e for part in gathered for e in part]
    else:
        measured = local
    events: list[dict[str, Any]] = []
    for rank in range(world_size):
        events.extend(_process(rank, f"rank {rank} (measured)", 2 * rank))
    events.extend(measured)
    data: dict[str, Any] = {"measured": True, **other, **_summary(measured, world_size)}
    data["clock"] = (
        "microseconds since a barrier just before the step, on each rank's clock"
        if distributed
        else "microseconds since the step started (the ranks are threads of one process: one clock)"
    )
    data["micro_batches"] = len(next(iter(timelines.values())).programs)
    if hardware is not None:
        simulated, sim = _simulated(next(iter(timelines.values())).programs, hardware, world_size)
        for rank in range(world_size):
            events.extend(_process(world_size + rank, f"rank {rank} (simulated)", 2 * rank + 1))
        events.extend(simulated)
        data.update(hardware=hardware.name, **sim)
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": data}


def _process(pid: int, name: str, order: int) -> list[dict[str, Any]]:
    """The metadata naming a process and its tracks; `order` sorts it in the viewer."""
    out = [
        {"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}},
        {"name": "process_sort_index", "ph": "M", "pid": pid, "args": {"sort_index": order}},
    ]
    for tid, label in TRACKS.items():
        out.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": label}})
    return out


def _summary(events: list[dict[str, Any]], world_size: int) -> dict[str, Any]:
    """Per rank, in ms: the step (from the clock's origin to the end of its last program event: the
    optimizer is not in it, as it is not in the simulated step), exposed communication, the optimizer."""
    step, exposed, optimizer = [0.0] * world_size, [0.0] * world_size, [0.0] * world_size
    for e in events:
        rank, end_ms, ms = e["pid"], (e["ts"] + e["dur"]) / 1e3, e["dur"] / 1e3
        if e["tid"] == OPTIMIZER_TRACK:
            optimizer[rank] += ms
            continue
        step[rank] = max(step[rank], end_ms)
        if e["cat"] == "exposed":
            exposed[rank] += ms
    return {
        "step_ms": max(step),
        "exposed_comm_ms": max(exposed),
        "optimizer_ms": max(optimizer),
        "rank_step_ms": step,
        "rank_exposed_comm_ms": exposed,
    }


def _simulated(
    programs: list[DistProgram], hw: cost_model.Hardware, world_size: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The cost model's trace of each micro-batch's program, one after another, for every rank (one SPMD
    program: the same simulated timeline on each)."""
    one_rank: list[dict[str, Any]] = []
    offset_us = exposed_ms = 0.0
    for micro_batch, program in enumerate(programs):
        simulated = cost_model.trace(program, hw, ranks=1)
        for e in simulated["traceEvents"]:
            if e["ph"] == "X":
                one_rank.append({**e, "ts": e["ts"] + offset_us, "args": {**e["args"], "micro_batch": micro_batch}})
        offset_us += simulated["otherData"]["step_ms"] * 1e3
        exposed_ms += simulated["otherData"]["exposed_comm_ms"]
    events = [{**e, "pid": world_size + rank} for rank in range(world_size) for e in one_rank]
    return events, {"simulated_step_ms": offset_us / 1e3, "simulated_exposed_comm_ms": exposed_ms}
