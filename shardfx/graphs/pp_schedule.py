"""Pipeline schedules as data, and the static check that they cannot hang.

A schedule is, for every stage, the list of steps its ranks run in order:
`Step(micro_batch, part)` with part "F" (the stage's forward of that
micro-batch) or "B" (its backward). The runtime executes the table and knows
nothing else about schedules.

- gpipe: every forward, then every backward (M micro-batches of activations alive).
- 1f1b: stage s runs P-1-s forwards, then alternates one forward and one backward,
  then the remaining backwards: at most P-s micro-batches alive on stage s.

`check(...)` proves, before anything runs, that every rank's sequence of sends,
receives and collectives over the whole schedule matches its peers': it plays
the schedule out with sends that never wait, receives that wait for the
oldest message of their tag from their peer, and collectives that wait for their whole
group, comparing kinds, shapes, dtypes and the value each message carries. A
mismatch, a receive nothing will satisfy or a rank left waiting is a
ScheduleError naming both ranks and both nodes, instead of a hang.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from shardfx.errors import ShardfxError
from shardfx.graphs.phases import BACKWARD_PART, FORWARD_PART, Event
from shardfx.graphs.program import Mesh


def stage_key(stage: int, variant: str) -> str:
    """The name of a pipeline stage's program of one variant ("stage1/last")."""
    return f"stage{stage}/{variant}"


class ScheduleError(ShardfxError):
    """The stage programs and the schedule would hang or exchange mismatched tensors."""


@dataclass(frozen=True)
class Step:
    micro_batch: int
    part: str  # FORWARD_PART or BACKWARD_PART
    chunk: int = 0  # interleaved schedules: which of the rank's stages (virtual stage chunk * P + rank)

    def __str__(self) -> str:
        return f"{self.part}{self.micro_batch}" + (f".{self.chunk}" if self.chunk else "")


@dataclass(frozen=True)
class PipelineSchedule:
    """What the runtime executes: each stage's steps, and which program variant runs micro-batch m."""

    kind: str
    stages: int  # stages of the model (virtual stages: ranks x chunks)
    micro_batches: int
    steps: tuple[tuple[Step, ...], ...]  # per pp coordinate (rank of the pipeline)
    variants: tuple[str, ...]  # per micro-batch ("middle" ... "last", or "step" for one)
    chunks: int = 1  # stages per rank (interleaved: stage v runs on pp coordinate v % ranks)

    @property
    def ranks(self) -> int:
        return self.stages // self.chunks

    def stage(self, coord: int, step: Step) -> int:
        """The model stage a step of the rank at pp coordinate `coord` runs."""
        return step.chunk * self.ranks + coord

    def coord(self, stage: int) -> int:
        """The pp coordinate that runs a model stage."""
        return stage % self.ranks

    def stages_of(self, coord: int) -> list[int]:
        return [c * self.ranks + coord for c in range(self.chunks)]

    def describe(self) -> str:
        extra = f", {self.chunks} stages a rank" if self.chunks > 1 else ""
        lines = [f"{self.kind}: {self.stages} stages x {self.micro_batches} micro-batches{extra}"]
        for r, steps in enumerate(self.steps):
            lines.append(f"  rank {r}: " + " ".join(str(step) for step in steps))
        return "\n".join(lines)


def gpipe(stages: int, micro_batches: int) -> list[list[Step]]:
    forward = [Step(m, FORWARD_PART) for m in range(micro_batches)]
    backward = [Step(m, BACKWARD_PART) for m in range(micro_batches)]
    return [forward + backward for _ in range(stages)]


def one_f_one_b(stages: int, micro_batches: int) -> list[list[Step]]:
    table = []
    for s in range(stages):
        warmup = min(stages - 1 - s, micro_batches)
        steps = [Step(m, FORWARD_PART) for m in range(warmup)]
        f, b = warmup, 0
        while f < micro_batches:
            steps.append(Step(f, FORWARD_PART))
            steps.append(Step(b, BACKWARD_PART))
            f, b = f + 1, b + 1
        steps.extend(Step(m, BACKWARD_PART) for m in range(b, micro_batches))
        table.append(steps)
    return table


EVAL = "eval"  # the variant name of eval_step's stage programs


def eval_table(ranks: int, micro_batches: int, chunks: int = 1) -> list[list[Step]]:
    """eval_step's pipeline: each micro-batch's forward (and the empty rest of the program) through
    the rank's stages in turn."""
    return [
        [
            Step(m, part, c)
            for m in range(micro_batches)
            for c in range(chunks)
            for part in (FORWARD_PART, BACKWARD_PART)
        ]
        for _ in range(ranks)
    ]


def interleaved_1f1b(ranks: int, micro_batches: int, chunks: int) -> list[list[Step]]:
    """Megatron's interleaved 1F1B: each rank holds `chunks` stages (stage c*P + r on rank r);
    micro-batches go through in groups of P, a rank's forwards cycle its chunks upwards and its
    backwards downwards, with (P-r-1)*2 + (chunks-1)*P warm-up forwards. Needs M % P == 0."""
    if micro_batches % ranks:
        raise ValueError(
            f"the interleaved schedule takes micro-batches in groups of pp_size={ranks}; got {micro_batches}"
        )
    total = micro_batches * chunks

    def unit(i: int, part: str) -> Step:
        group, within = divmod(i, ranks * chunks)
        chunk = within // ranks
        if part == BACKWARD_PART:
            chunk = chunks - 1 - chunk
        return Step(group * ranks + within % ranks, part, chunk)

    out = []
    for r in range(ranks):
        warmup = min((ranks - r - 1) * 2 + (chunks - 1) * ranks, total)
        steps = [unit(i, FORWARD_PART) for i in range(warmup)]
        for i in range(total - warmup):
            steps.append(unit(warmup + i, FORWARD_PART))
            steps.append(unit(i, BACKWARD_PART))
        steps.extend(unit(i, BACKWARD_PART) for i in range(total - warmup, total))
        out.append(steps)
    return out


SCHEDULES: dict[str, Callable[..., list[list[Step]]]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved_1f1b": interleaved_1f1b,
}


def table(kind: str, ranks: int, micro_batches: int, chunks: int = 1) -> list[list[Step]]:
    """Each pp coordinate's steps for a schedule of `kind` (chunks: stages a rank, interleaved only)."""
    if kind not in SCHEDULES:
        raise ValueError(f"pipeline schedule {kind!r} is not known; choose one of {list(SCHEDULES)}")
    if kind == "interleaved_1f1b":
        return interleaved_1f1b(ranks, micro_batches, chunks)
    return SCHEDULES[kind](ranks, micro_batches)


def alive_by_stage(kind: str, ranks: int, micro_batches: int, chunks: int = 1) -> list[int]:
    """For every model stage, the most micro-batches its ranks keep alive at once under `kind`."""
    steps = table(kind, ranks, micro_batches, chunks)
    out = [0] * (ranks * chunks)
    for r, rank_steps in enumerate(steps):
        for c in range(chunks):
            out[c * ranks + r] = alive_peak([s for s in rank_steps if s.chunk == c])
    return out


def alive_peak(steps: list[Step]) -> int:
    """The most micro-batches whose forward ran and backward has not, along one stage's steps."""
    alive = peak = 0
    for step in steps:
        alive += 1 if step.part == FORWARD_PART else -1
        peak = max(peak, alive)
    return peak


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """The idle share of a GPipe or 1F1B step with equal stages: (P-1) / (M+P-1)."""
    return (stages - 1) / (micro_batches + stages - 1)


@dataclass(frozen=True)
class _Sent:
    event: Event
    rank: int
    step: Step


def check(
    mesh: Mesh,
    steps: Callable[[int], list[Step]],
    events: Callable[[int, Step], list[Event]],
    axis: str = "pp",
) -> int:
    """Play the schedule out on every rank (see the module docstring); returns the events matched.

    steps(rank): the rank's schedule; events(rank, step): what that step of that rank communicates."""
    n = mesh.world_size
    queues: list[deque[tuple[Step, Event]]] = []
    for r in range(n):
        q: deque[tuple[Step, Event]] = deque()
        for step in steps(r):
            q.extend((step, e) for e in events(r, step))
        queues.append(q)
    channels: dict[tuple[int, int, int], deque[_Sent]] = {}  # (src, dst, tag)
    matched = 0

    def where(r: int, step: Step, e: Event) -> str:
        return f"rank {r} ({_coords(mesh, r)}), step {step}, node {e.node}" + (f" ({e.module})" if e.module else "")

    while True:
        progress = False
        for r in range(n):
            while queues[r]:
                step, e = queues[r][0]
                if e.kind == "send":
                    dst = _peer(mesh, r, e.axis, e.peer, where(r, step, e))
                    channels.setdefault((r, dst, e.tag), deque()).append(_Sent(e, r, step))
                elif e.kind == "recv":
                    src = _peer(mesh, r, e.axis, e.peer, where(r, step, e))
                    box = channels.get((src, r, e.tag))
                    if not box:
                        break
                    sent = box.popleft()
                    s = sent.event
                    if (s.shape, s.dtype, s.extra) != (
                        e.shape,
                        e.dtype,
                        e.extra,
                    ) or sent.step.micro_batch != step.micro_batch:
                        raise ScheduleError(
                            "a send and its receive disagree:\n"
                            f"  {where(src, sent.step, s)} sends {_what(s)} of micro-batch {sent.step.micro_batch}\n"
                            f"  {where(r, step, e)} receives {_what(e)} of micro-batch {step.micro_batch}"
                        )
                else:
                    group = mesh.group(r, e.axis)
                    if len(group) > 1:
                        heads = [queues[q][0] if queues[q] else None for q in group]
                        if any(h is None or h[1].kind in ("send", "recv") or h[1].axis != e.axis for h in heads):
                            break  # a peer is not at a collective of this axis yet
                        for q, (qstep, qe) in zip(group, heads):
                            if (qe.kind, qe.axis, qe.shape, qe.dtype, qe.extra) != (
                                e.kind,
                                e.axis,
                                e.shape,
                                e.dtype,
                                e.extra,
                            ):
                                raise ScheduleError(
                                    "ranks disagree on a collective:\n"
                                    f"  {where(r, step, e)}: {_what(e)}\n  {where(q, qstep, qe)}: {_what(qe)}"
                                )
                        for q in group:
                            if q != r:
                                queues[q].popleft()
                                matched += 1
                queues[r].popleft()
                matched += 1
                progress = True
        if all(not q for q in queues):
            break
        if not progress:
            waiting = [f"  {where(r, *q[0])} waits to {_verb(q[0][1])}" for r, q in enumerate(queues) if q]
            raise ScheduleError("the pipeline would hang:\n" + "\n".join(waiting))
    left = [(k, box) for k, box in channels.items() if box]
    if left:
        (src, dst, _), box = left[0]
        sent = box[0]
        raise ScheduleError(
            f"{where(src, sent.step, sent.event)} sends {_what(sent.event)} to rank {dst}, which never receives it:\n"
            f"  rank {dst} ({_coords(mesh, dst)}) runs {sent.step} with no receive from rank {src} left for it"
        )
    return matched


def _peer(mesh: Mesh, rank: int, axis: str, offset: int, where: str) -> int:
    other = mesh.peer(rank, axis, offset)
    if other is None:
        raise ScheduleError(f"{where}: no peer {offset:+d} on axis {axis!r}")
    return other


def _coords(mesh: Mesh, rank: int) -> str:
    return ", ".join(f"{a}={c}" for a, c in mesh.coords(rank).items())


def _what(e: Event) -> str:
    if e.kind in ("send", "recv"):
        return f"{e.extra[0] if e.extra and e.extra[0] else 'a tensor'} (shape={list(e.shape)}, dtype={e.dtype})"
    return f"{e.kind}(axis={e.axis!r}, shape={list(e.shape)}, dtype={e.dtype}, {e.extra})"


def _verb(e: Event) -> str:
    if e.kind == "recv":
        return f"receive {_what(e)} from peer {e.peer:+d} on {e.axis!r}"
    return f"join {_what(e)}"
