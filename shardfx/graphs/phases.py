"""A stage program as two executables: its forward and its backward.

A pipeline runs a stage's forward of one micro-batch, and its backward later
(after other micro-batches' forwards: 1F1B), so the joint program of a stage
is split by phase: the forward part runs every forward node and returns the
values the rest of the program reads (the saved activations, and the
forward-phase outputs such as the loss); the backward part takes the same
inputs plus those saved values and returns the program's outputs. Nodes no
pass gave a phase are refused by verify.py before this runs.

`events` lists what each part says to other ranks, in order: the sends,
receives and collectives the static pipeline check (graphs/pp_schedule.check)
matches against the peers'.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from shardfx.errors import ShardfxError
from shardfx.graphs import collectives, meta
from shardfx.graphs.program import DistProgram

FORWARD_PART = "F"
BACKWARD_PART = "B"


@dataclass(frozen=True)
class Event:
    """One communication of a program part: a send, a receive or a collective."""

    kind: str  # "send", "recv", or a collective kind (all_reduce, all_gather, reduce_scatter)
    axis: str
    peer: int  # relative, for send and recv (0 for collectives)
    shape: tuple[int, ...]
    dtype: torch.dtype
    extra: tuple  # a collective's options (op, dim); a p2p's tag (the value it carries)
    node: str  # the node, for errors
    module: str = ""
    tag: int = 0  # a send's or receive's tag: a receive takes the oldest message of its tag


@dataclass
class PhaseSplit:
    forward: fx.GraphModule  # (*program inputs) -> (*saved)
    backward: fx.GraphModule  # (*program inputs, *saved) -> program outputs
    saved: list[str]  # the forward values the backward reads, by node name
    saved_bytes: int = 0  # their bytes for one micro-batch (views of one storage once)
    events: dict[str, list[Event]] = field(default_factory=dict)  # FORWARD_PART / BACKWARD_PART -> events


def split_phases(program: DistProgram) -> PhaseSplit:
    graph = program.graph
    forward = [n for n in graph.nodes if n.op == "call_function" and meta.phase(n) == meta.FORWARD]
    in_forward = set(forward)
    for node in forward:
        for arg in node.all_input_nodes:
            if arg.op == "call_function" and arg not in in_forward:
                raise ShardfxError(
                    f"forward node reads {arg.name}, a {meta.get(arg, meta.PHASE)} value: the stage cannot run "
                    "its forward before its backward",
                    node,
                )
    saved = [n for n in forward if any(u not in in_forward for u in n.users)]
    placeholders = program.placeholders()

    fwd = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in placeholders:
        env[node] = fwd.node_copy(node)
    for node in graph.nodes:
        if node.op == "get_attr":
            env[node] = fwd.node_copy(node)
    for node in forward:
        env[node] = fwd.node_copy(node, lambda n: env[n])
    fwd.output(tuple(env[n] for n in saved))

    bwd = fx.Graph()
    benv: dict[fx.Node, fx.Node] = {}
    for node in placeholders:
        benv[node] = bwd.node_copy(node)
    for i, node in enumerate(saved):
        holder = bwd.placeholder(f"saved_{i}_{node.name}")
        holder.meta = dict(node.meta)
        benv[node] = holder
    for node in graph.nodes:
        if node.op == "get_attr":
            benv[node] = bwd.node_copy(node)
        elif node.op in ("call_function", "call_method", "call_module") and node not in in_forward:
            benv[node] = bwd.node_copy(node, lambda n: benv[n])
        elif node.op == "output":
            bwd.node_copy(node, lambda n: benv[n])
    split = PhaseSplit(
        fx.GraphModule(program.gm, fwd), fx.GraphModule(program.gm, bwd), [n.name for n in saved], _bytes(saved)
    )
    split.events = {
        FORWARD_PART: events(forward),
        BACKWARD_PART: events(n for n in graph.nodes if n.op == "call_function" and n not in in_forward),
    }
    return split


SAVED = "saved"  # the role, in a printed part's signature, of a value the forward keeps for the backward


def part_programs(program: DistProgram) -> dict[str, DistProgram]:
    """The forward and backward parts as programs of their own, to print (format_program): the
    forward returns, and the backward takes, the saved values (signature role "saved")."""
    import copy

    from shardfx.graphs.signature import InputSpec, OutputSpec, Signature

    split = program.notes.get("phases") or split_phases(program)
    inputs = copy.deepcopy(program.signature.inputs)
    forward = Signature(inputs, [OutputSpec(SAVED, name) for name in split.saved])
    backward = Signature(inputs + [InputSpec(SAVED, name) for name in split.saved], program.signature.outputs)
    return {
        FORWARD_PART: DistProgram(
            split.forward, forward, program.mesh, program.fake_mode, program.shard_specs, program.tp_specs
        ),
        BACKWARD_PART: DistProgram(
            split.backward, backward, program.mesh, program.fake_mode, program.shard_specs, program.tp_specs
        ),
    }


def _bytes(nodes: list[fx.Node]) -> int:
    """Bytes of the values of `nodes`, a view counted with its base (as the runtime holds them)."""
    from shardfx.graphs.analysis import storage_owner, tensor_bytes

    owners = {storage_owner(n) for n in nodes}
    return sum(tensor_bytes(o.meta.get("val")) for o in owners if o.op != "placeholder")


def events(nodes) -> list[Event]:  # noqa: ANN001 - any iterable of nodes
    """The communications of `nodes`, in order."""
    out: list[Event] = []
    for node in nodes:
        module = str(meta.get(node, meta.MODULE) or "")
        if node.target is collectives.SEND:
            val = node.args[0].meta["val"]
            axis, peer, tag = node.args[1:4]
            target = (meta.get(node, meta.TARGET),)
            out.append(Event("send", axis, peer, tuple(val.shape), val.dtype, target, node.name, module, tag))
        elif node.target is collectives.RECV:
            shape, dtype, _, axis, peer, tag = node.args
            target = (meta.get(node, meta.TARGET),)
            out.append(Event("recv", axis, peer, tuple(shape), dtype, target, node.name, module, tag))
        elif collectives.is_collective(node):
            val = node.args[0].meta["val"]
            extra = tuple(a for a in node.args[2:] if not isinstance(a, fx.Node))
            out.append(
                Event(
                    collectives.kind(node),
                    collectives.axis_of(node),
                    0,
                    tuple(val.shape),
                    val.dtype,
                    extra,
                    node.name,
                    module,
                )
            )
    return out
