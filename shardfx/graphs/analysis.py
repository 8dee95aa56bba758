"""Analyses of a per-rank program: pure functions of the graph, never mutating it.

`memory_timeline(program)` simulates the program in its execution order with
sizes from `val`: a node's output is allocated when the node runs and freed
after the last node that reads it or any view of it (which is when the
generated code drops its last reference). Placeholders (parameters, buffers,
the batch) are held by the runtime for the whole step, and returned values
from when they are made to the end. Collective
results (gathered parameters, reduced gradients) are ordinary allocations, so
in-flight gathers are counted.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx

from shardfx.graphs import collectives, ops
from shardfx.graphs.program import DistProgram

ALIAS_OPS = ops.ALIAS_OPS  # ops whose output shares its input's storage (graphs/ops.py)


def tensor_bytes(val: object) -> int:
    if isinstance(val, torch.Tensor):
        return val.numel() * val.element_size()
    if isinstance(val, (tuple, list)):
        return sum(tensor_bytes(v) for v in val)
    return 0


@dataclass
class MemoryTimeline:
    nodes: list[fx.Node]
    live: list[int]  # bytes live while each node runs (its inputs and its output)
    held: int  # bytes the runtime holds all step: the placeholders (returned values are held from when they are made)
    peak: int
    peak_node: fx.Node | None
    lifetimes: dict[fx.Node, tuple[int, int, int]]  # owner -> (alloc index, free index, bytes); held ones excluded

    def live_at(self, node: fx.Node) -> list[tuple[fx.Node, int]]:
        """The allocations live while `node` runs, largest first: what makes up its live bytes."""
        i = self.nodes.index(node)
        live = [(o, nbytes) for o, (a, f, nbytes) in self.lifetimes.items() if a <= i <= f]
        return sorted(live, key=lambda t: -t[1])

    def peak_mib(self) -> float:
        return self.peak / 2**20


def storage_owner(node: fx.Node) -> fx.Node:
    """The node whose allocation `node`'s value lives in (itself unless it is a view or a tuple element)."""
    while node.op == "call_function" and (node.target in ALIAS_OPS or node.target is operator.getitem):
        if node.target is operator.getitem and node.args[0].target not in ALIAS_OPS:
            return node  # an element of a multi-output op: its own allocation
        node = node.args[0]
    return node


def memory_timeline(program: DistProgram) -> MemoryTimeline:
    nodes = list(program.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    outputs = set(program.outputs())
    owner = {n: storage_owner(n) for n in nodes if n.op != "output"}
    size: dict[fx.Node, int] = {}
    for n in nodes:
        if n.op == "output" or owner[n] is not n:
            continue
        if n.op == "call_function" and isinstance(n.meta.get("val"), (tuple, list)):
            size[n] = 0  # elements are counted at their getitem; unread elements are transient
        else:
            size[n] = tensor_bytes(n.meta.get("val"))
    last_use: dict[fx.Node, int] = {o: index[o] for o in size}
    for n in nodes:
        reads = list(n.all_input_nodes)
        if collectives.is_wait(n) and collectives.kind(n.args[0]) != "all_gather":
            # the transfer reads the start's input until it is waited for; a gather's start copies
            # its input into the output's own rows and sends from there (runtime/dist_comm.py)
            reads += n.args[0].all_input_nodes
        for arg in reads:
            o = owner.get(arg, arg)
            if o in last_use:
                last_use[o] = max(last_use[o], index[n])
    returned = {owner[o] for o in outputs}
    held = 0
    frees: Counter = Counter()
    allocs: Counter = Counter()
    lifetimes: dict[fx.Node, tuple[int, int, int]] = {}
    for o, nbytes in size.items():
        if o.op == "placeholder":
            held += nbytes
            continue
        allocs[index[o]] += nbytes
        if o not in returned:  # returned values stay allocated to the end of the step
            frees[last_use[o]] += nbytes
        lifetimes[o] = (index[o], last_use[o] if o not in returned else len(nodes), nbytes)
    # multi-output ops: elements nobody reads exist only while the op runs
    transient = Counter()
    for n in nodes:
        if n.op == "call_function" and isinstance(n.meta.get("val"), (tuple, list)):
            read = {u.args[1] for u in n.users if u.target is operator.getitem}
            transient[index[n]] = sum(tensor_bytes(v) for i, v in enumerate(n.meta["val"]) if i not in read)
    live: list[int] = []
    current = held
    for i in range(len(nodes)):
        current += allocs[i]
        live.append(current + transient[i])
        current -= frees[i]
    peak = max(live) if live else held
    peak_node = nodes[live.index(peak)] if live else None
    return MemoryTimeline(nodes, live, held, peak, peak_node, lifetimes)


def collective_summary(program: DistProgram) -> dict[str, dict[str, int]]:
    """Collectives by kind: how many and how many bytes (the ZeRO paper's unit), from the graph alone."""
    calls: Counter = Counter()
    volume: Counter = Counter()
    for node in program.graph.nodes:
        if collectives.is_collective(node):
            kind = collectives.kind(node)
            calls[kind] += 1
            volume[kind] += collectives.volume_bytes(
                kind, tensor_bytes(node.args[0].meta["val"]), tensor_bytes(node.meta["val"])
            )
    return {"calls": dict(calls), "volume": dict(volume)}
