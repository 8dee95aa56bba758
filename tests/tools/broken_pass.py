"""Deliberately broken passes for the bisect tests: each spoils one gradient's reduction.

`drop_one_grad_reduction` removes the first gradient all-reduce of the graph
and rewires its users to the unreduced gradient, so every rank returns its own
batch slice's gradient instead of the average. `sum_one_grad_reduction` turns
the last gradient reduce-scatter's average into a sum (N times too large).
Both name the parameter they spoiled in their stats.
"""

from __future__ import annotations

from shardfx.graphs import collectives, meta
from shardfx.graphs.program import DistProgram
from shardfx.passes.manager import PassContext, PassResult


def _grad_syncs(program: DistProgram, kind: str):
    return [
        n
        for n in program.graph.nodes
        if collectives.is_collective(n) and collectives.kind(n) == kind and n.meta.get(meta.ROLE) == "grad_sync"
    ]


def drop_one_grad_reduction(program: DistProgram, ctx: PassContext) -> PassResult:
    node = _grad_syncs(program, "all_reduce")[0]
    node.replace_all_uses_with(node.args[0])
    program.graph.erase_node(node)
    return PassResult(program, {"spoiled": node.meta[meta.TARGET]})


def sum_one_grad_reduction(program: DistProgram, ctx: PassContext) -> PassResult:
    node = _grad_syncs(program, "reduce_scatter")[-1]
    node.args = (node.args[0], node.args[1], "sum", *node.args[3:])
    return PassResult(program, {"spoiled": node.meta[meta.TARGET]})
