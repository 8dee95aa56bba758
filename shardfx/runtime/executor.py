"""Run one rank's step of a DistProgram: bind state and batch to placeholders, route outputs.

The executor knows nothing about passes: it reads the signature, runs the
graph with this rank's communicator bound, and hands back the loss, the
gradients (by parameter name), the new buffer values and, under gradient
accumulation, the new gradient accumulators and the gathered parameter
replicas to keep. An accumulator the caller does not have yet (the first
micro-batch) is bound to zeros; a replica must have been kept. A GRAD_SUM
input is bound to the parameter's kept `.grad` (zeros if none). Given a Timeline, the
graph runs node by node and every node is timed into it (runtime/step_trace.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor

from shardfx.errors import ExecutionError, ShardfxError
from shardfx.graphs import collectives
from shardfx.graphs.phases import BACKWARD_PART, FORWARD_PART, split_phases
from shardfx.graphs.program import PHASES, DistProgram
from shardfx.graphs.signature import (
    BUFFER,
    BUFFER_UPDATE,
    GRAD,
    GRAD_ACC,
    GRAD_NORM,
    GRAD_SUM,
    INPUT,
    LOSS,
    LOSS_SCALE,
    PARAM,
    REPLICA,
)
from shardfx.runtime.step_trace import TimedRun, Timeline


@dataclass
class StepOutputs:
    loss: Tensor | None  # None: a pipeline stage before the last
    grads: dict[str, Tensor]
    buffers: dict[str, Tensor]
    accumulators: dict[str, Tensor]
    replicas: dict[str, Tensor]
    grad_norm: Tensor | None = None
    totals: frozenset[str] = frozenset()  # params whose GRAD already includes the kept sum (GRAD_SUM)


class Executor:
    def __init__(self, program: DistProgram) -> None:
        self.program = program
        self.gm = program.gm
        self.signature = program.signature
        self.placeholder_vals = [n.meta["val"] for n in program.placeholders()]
        # parameters whose GRAD output already holds the kept sum (sum_gradients): the state replaces .grad
        self.totals = frozenset(spec.name for spec in self.signature.inputs if spec.role == GRAD_SUM)
        # The k-th collective a rank issues is the k-th collective node of the graph (SPMD,
        # nodes run in graph order), so errors can name the node without an interpreter.
        self.lossless = False
        self._timed: TimedRun | None = None  # made at the first traced step (engine.trace_step)
        self.collective_sites = [
            f"node {n.name} ({n.meta.get('shardfx.module') or 'root'})"
            for n in program.graph.nodes
            if collectives.is_collective(n)
        ]

    def run(
        self,
        comm: collectives.Communicator,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        batch: tuple[Tensor, ...],
        accumulators: dict[str, Tensor] | None = None,
        replicas: dict[str, Tensor] | None = None,
        loss_scale: Tensor | None = None,
        timeline: Timeline | None = None,
    ) -> StepOutputs:
        """One rank's step; `timeline`: time every node into it (the same ops: the same results)."""
        args = self.arguments(params, buffers, batch, accumulators, replicas, loss_scale=loss_scale)
        sites = iter(self.collective_sites)
        if hasattr(comm, "where"):
            comm.where = lambda: next(sites, "(past the last collective node)")
        with torch.no_grad(), collectives.bind(comm):
            if timeline is None:
                values = call_graph(self.gm, args)
            else:
                self._timed = self._timed or TimedRun(self.gm)
                timeline.begin_run(self.program)
                values = call_graph(self.gm, args, timeline, self._timed)
        return self.outputs(values)

    def arguments(
        self,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        batch: tuple[Tensor, ...],
        accumulators: dict[str, Tensor] | None = None,
        replicas: dict[str, Tensor] | None = None,
        unbound: frozenset[str] = frozenset(),
        loss_scale: Tensor | None = None,
    ) -> list[Tensor | None]:
        """The graph's arguments, in placeholder order, from this rank's state and batch; None for
        the roles in `unbound` (a pipeline stage's forward reads no gradient accumulator).
        `loss_scale`: the fp16 loss scale (a 0-dim fp32 tensor) for a LOSS_SCALE input."""
        args: list[Tensor | None] = []
        for spec, val in zip(self.signature.inputs, self.placeholder_vals):
            if spec.role in unbound:
                args.append(None)
            elif spec.role == PARAM:
                args.append(params[spec.name].detach())
            elif spec.role == BUFFER:
                args.append(buffers[spec.name])
            elif spec.role == INPUT:
                args.append(batch[spec.batch_index])
            elif spec.role == GRAD_ACC:
                kept = (accumulators or {}).get(spec.name)
                if kept is None:
                    kept = torch.zeros(val.shape, dtype=val.dtype, device=params[spec.name].device)
                args.append(kept)
            elif spec.role == REPLICA:
                if replicas is None or spec.name not in replicas:
                    raise RuntimeError(
                        f"this step reads the replica of {spec.name} gathered by an earlier micro-batch, "
                        "and none is kept (the first micro-batch of an optimizer step gathers them)"
                    )
                args.append(replicas[spec.name])
            elif spec.role == GRAD_SUM:
                kept = params[spec.name].grad
                if kept is None:
                    kept = torch.zeros(val.shape, dtype=val.dtype, device=params[spec.name].device)
                args.append(kept)
            elif spec.role == LOSS_SCALE:
                if loss_scale is None:
                    raise RuntimeError("this step scales its loss (fp16) and was given no loss scale")
                args.append(loss_scale)
            else:  # pragma: no cover - signature roles are closed
                raise AssertionError(spec.role)
        return args

    def outputs(self, values: Sequence[Tensor]) -> StepOutputs:
        """The graph's return values routed by their signature roles."""
        loss: Tensor | None = None
        grads: dict[str, Tensor] = {}
        new_buffers: dict[str, Tensor] = {}
        new_accumulators: dict[str, Tensor] = {}
        new_replicas: dict[str, Tensor] = {}
        grad_norm: Tensor | None = None
        for spec, value in zip(self.signature.outputs, values):
            if spec.role == LOSS:
                loss = value
            elif spec.role == GRAD:
                grads[spec.target] = value
            elif spec.role == BUFFER_UPDATE:
                new_buffers[spec.target] = value
            elif spec.role == GRAD_ACC:
                new_accumulators[spec.target] = value
            elif spec.role == REPLICA:
                new_replicas[spec.target] = value
            elif spec.role == GRAD_NORM:
                grad_norm = value
        if loss is None and not self.lossless:
            raise AssertionError("the program returned no loss")
        return StepOutputs(loss, grads, new_buffers, new_accumulators, new_replicas, grad_norm, self.totals)


class StageExecutor(Executor):
    """A pipeline stage's program, run as two parts: the forward of a micro-batch (`forward`,
    returning what its backward reads) and, later, its backward (`backward`)."""

    def __init__(self, program: DistProgram) -> None:
        super().__init__(program)
        self.lossless = True  # only the last stage computes the loss
        self.split = program.notes.get(PHASES) or split_phases(program)
        self.sites = {
            part: [f"node {e.node} ({e.module or 'root'})" for e in events]
            for part, events in self.split.events.items()
        }

    def _bind(self, comm: collectives.Communicator, part: str) -> None:
        sites = iter(self.sites[part])
        if hasattr(comm, "where"):
            comm.where = lambda: next(sites, "(past the last communication node)")

    def forward(self, comm: collectives.Communicator, args: list[Tensor]) -> tuple[Tensor, ...]:
        self._bind(comm, FORWARD_PART)
        with torch.no_grad(), collectives.bind(comm):
            return tuple(call_graph(self.split.forward, args))

    def backward(self, comm: collectives.Communicator, args: list[Tensor], saved: tuple[Tensor, ...]) -> StepOutputs:
        self._bind(comm, BACKWARD_PART)
        with torch.no_grad(), collectives.bind(comm):
            values = call_graph(self.split.backward, [*args, *saved])
        return self.outputs(values)


def call_graph(
    gm: fx.GraphModule, args: list[Any], timeline: Timeline | None = None, timed: TimedRun | None = None
) -> Any:
    """gm(*args). A failure inside it that is not a shardfx error (a CollectiveError stays one) becomes an
    ExecutionError naming the node that raised, its module and source line: the traceback of the generated
    code names neither. `timeline`: run the nodes one by one instead (`timed`: gm's TimedRun, made if not
    given), timing each into its current run (Timeline.begin_run)."""
    try:
        return gm(*args) if timeline is None else (timed or TimedRun(gm)).run(args, timeline)
    except (ShardfxError, torch.OutOfMemoryError):
        raise  # named already, or caught by type (a smaller batch is the usual answer to OOM)
    except Exception as exc:
        node = _failed_node(gm, exc.__traceback__) if timeline is None else timeline.current
        first = (str(exc).strip().splitlines() or [""])[0]
        where = f"node {node.name} ({node.target})" if node is not None else "one of its nodes"
        raise ExecutionError(f"the compiled program failed at {where}: {type(exc).__name__}: {first}", node) from exc


def _failed_node(gm: fx.GraphModule, tb: Any) -> fx.Node | None:
    """The node whose line of gm's generated code the traceback `tb` last passed through (None if unknown)."""
    code = getattr(getattr(type(gm), "forward", None), "__code__", None)
    lines = getattr(gm, "_lineno_map", None)  # generated line -> node index, kept by torch.fx
    line = None
    while tb is not None:
        if code is not None and tb.tb_frame.f_code.co_filename == code.co_filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    # the map counts lines from the `def forward` line
    index = lines.get(line - code.co_firstlineno) if line is not None and lines and code is not None else None
    nodes = list(gm.graph.nodes) if index is not None else []
    return nodes[index] if index is not None and 0 <= index < len(nodes) else None
