"""A measured step: every node of every rank's program timed, as a Chrome / Perfetto trace.

The cost model predicts a step (graphs/cost_model.trace); this measures one in the same layout,
so that prediction and measurement open side by side in ui.perfetto.dev. `engine.trace_step(*batch)`
runs one optimizer step (every micro-batch of it) as train_step does, except that each rank runs
its program node by node (TimedRun: the graph's own calls on the same values in the same order,
each value dropped after its last use, as the generated code does), so the step's results are
bitwise those of the generated code (tests/runtime/test_step_trace.py checks it). Per rank it records

- compute track (tid 0): every compute node, named by its op, with the node, its module and
  phase in the args; "exposed" slices (category "exposed", as in the simulated trace) for the
  time compute sits in communication: a synchronous collective, a `*_start` while it issues
  (the local runtime runs the whole collective there) and a `wait`;
- communication track (tid 1): every collective; a `*_start` from its issue until its wait
  returned, an upper bound of its completion (nothing says when the data landed earlier; the
  event's args say so), a synchronous one for the time it took;
- optimizer track (tid 2): optimizer.step, which runs outside the program (and so outside step_ms).

Timestamps count from a barrier just before the step on every rank (the local runtime's ranks
are threads of one process: one clock, one origin, taken before they start; they also share the
GIL, so judge overlap by the processes runtime's trace). On CUDA every node ends with the compute
stream synchronised, so a node's time is its kernels', not their launch; NCCL's stream is left
alone, so an async collective still overlaps compute until its wait. Running node by node costs a
few microseconds of Python a node more than the generated code; the clock is read right around
each call, so that cost falls in the gaps between nodes (visible on a small model on a CPU).
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
    """One rank's measured step: the calls of every program run (micro-batch) and the spans outside
    them, as time.perf_counter readings; `events()` turns them into Chrome trace events in
    microseconds since `origin`. `sync`: what makes a node's work finished before its end is read
    (the CUDA compute stream's synchronize; None on a CPU). Recording appends one tuple a node, the
    events are built after the step, so the step itself pays little for being measured."""

    def __init__(self, rank: int, origin: float, sync: Callable[[], None] | None = None) -> None:
        self.rank = rank
        self.origin = origin
        self.sync = sync
        self.runs: list[tuple[DistProgram, list[tuple[fx.Node, float, float]]]] = []  # (program, its calls)
        self.spans: list[tuple[int, str, str, float, float]] = []  # (track, name, category, begin, end)
        self.current: fx.Node | None = None  # the node running (or the one that raised), for the error

    @property
    def programs(self) -> list[DistProgram]:
        """The program of every micro-batch run, in order."""
        return [program for program, _ in self.runs]

    def begin_run(self, program: DistProgram) -> None:
        """A program (one micro-batch) starts on this rank: its calls go to `calls`."""
        self.calls: list[tuple[fx.Node, float, float]] = []
        self.runs.append((program, self.calls))

    @contextmanager
    def span(self, track: int, name: str, category: str) -> Iterator[None]:
        """Time the block as one slice (the optimizer step, outside the program)."""
        begin = time.perf_counter()
        yield
        if self.sync is not None:
            self.sync()
        self.spans.append((track, name, category, begin, time.perf_counter()))

    def events(self) -> list[dict[str, Any]]:
        """Every call and span as Chrome trace events (pid: the rank; tid: the track)."""
        out: list[dict[str, Any]] = []

        def add(track: int, name: str, cat: str, begin: float, end: float, args: dict[str, Any]) -> None:
            out.append(
                {
                    "name": name,
                    "cat": cat,
                    "ph": "X",
                    "pid": self.rank,
                    "tid": track,
                    "ts": (begin - self.origin) * 1e6,
                    "dur": (end - begin) * 1e6,
                    "args": args,
                }
            )

        for micro_batch, (_, calls) in enumerate(self.runs):
            issued: dict[fx.Node, float] = {}  # `*_start` nodes whose wait has not run: their issue time
            for node, begin, end in calls:
                where = {**_where(node), "micro_batch": micro_batch}
                if collectives.is_start(node):
                    issued[node] = begin
                    add(COMPUTE_TRACK, f"{collectives.kind(node)} (issue)", "exposed", begin, end, where)
                elif collectives.is_wait(node):
                    add(COMPUTE_TRACK, "wait", "exposed", begin, end, where)
                    start = node.args[0]
                    if isinstance(start, fx.Node) and start in issued:
                        args = {**_where(start), "micro_batch": micro_batch, "wait": node.name, "end": WAIT_END}
                        add(COMM_TRACK, collectives.kind(start), "collective", issued.pop(start), end, args)
                elif collectives.is_collective(node):
                    kind = collectives.kind(node)
                    add(COMM_TRACK, kind, "collective", begin, end, {**where, "end": "when it returned (synchronous)"})
                    add(COMPUTE_TRACK, f"{kind} (synchronous)", "exposed", begin, end, where)
                else:
                    add(COMPUTE_TRACK, op_name(node.target), "compute", begin, end, where)
            last = calls[-1][2] if calls else self.origin
            for start, begin in issued.items():  # none is left where verify paired every start with a wait
                args = {**_where(start), "micro_batch": micro_batch, "end": "the program ended (no wait of it ran)"}
                add(COMM_TRACK, collectives.kind(start), "collective", begin, last, args)
        for track, name, cat, begin, end in self.spans:
            add(track, name, cat, begin, end, {})
        return out


def _where(node: fx.Node) -> dict[str, Any]:
    return {"node": node.name, "module": node.meta.get(meta.MODULE) or "", "phase": node.meta.get(meta.PHASE, "")}


class TimedRun:
    """Runs a graph's nodes one by one as its generated code does (the same calls on the same values,
    each value dropped after its last use), timing every call into a Timeline.

    Not fx.Interpreter: its bookkeeping costs about 12 us of Python a node against 3 here (a
    2-core VM), which doubles the step of a small model. The clock is read right around the
    call, so what remains shows as gaps between nodes, not inside them. Holds nothing of a run:
    the local runtime's rank threads share one.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        last_use: dict[fx.Node, fx.Node] = {}
        for node in reversed(self.nodes):
            for used in node.all_input_nodes:
                last_use.setdefault(used, node)
        self.frees: dict[fx.Node, list[fx.Node]] = {}  # node -> the values whose last use it is
        for used, user in last_use.items():
            self.frees.setdefault(user, []).append(used)

    def run(self, args: list[Any], timeline: Timeline) -> Any:
        """gm(*args), each call recorded into timeline.calls; timeline.current names the node running."""
        env: dict[fx.Node, Any] = {}
        value = env.__getitem__
        inputs = iter(self.gm.graph.process_inputs(*args))
        sync, clock, calls = timeline.sync, time.perf_counter, timeline.calls
        for node in self.nodes:
            timeline.current = node
            if node.op == "placeholder":
                env[node] = next(inputs)
            elif node.op == "output":
                return self.gm.graph.process_outputs(fx.map_arg(node.args[0], value))
            elif node.op == "get_attr":
                env[node] = _attribute(self.gm, str(node.target))
            else:
                fn = self._callable(node)
                call_args, call_kwargs = fx.map_arg(node.args, value), fx.map_arg(node.kwargs, value)
                begin = clock()
                env[node] = fn(*call_args, **call_kwargs)
                if sync is not None:
                    sync()
                calls.append((node, begin, clock()))
            for used in self.frees.get(node, ()):
                del env[used]
        raise AssertionError("the graph has no output node")

    def _callable(self, node: fx.Node) -> Callable[..., Any]:
        if node.op == "call_function":
            return node.target  # type: ignore[return-value]
        if node.op == "call_module":
            return self.gm.get_submodule(str(node.target))
        assert node.op == "call_method", node.op
        return lambda obj, *args, **kwargs: getattr(obj, str(node.target))(*args, **kwargs)


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


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
    local = [e for r in sorted(timelines) for e in timelines[r].events()]
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
