"""fuse: group memory-bound ops into regions that lower_to_triton turns into one kernel each.

First rewrites the composite ops of kernels.rules.DECOMPOSE (layer norm, GELU,
softmax, log-softmax, nll loss and their backwards) into torch's own
decompositions, so that their pieces fuse with their neighbours. Then walks
the graph in order and puts each op the rules table knows into the region of
one of its producers when it fits that region's (rows, cols) domain
(kernels.classify), is in the same phase, and joining makes no cycle between
regions; otherwise it starts a region. So a region holds pointwise ops (with
broadcasting and scalars), casts, and last-dim reductions with their prologue
and epilogue over the same rows. Collectives, matmuls, random ops and anything
else the table lacks are never in a region, and no region reaches around one
(that would be a cycle). A value read outside its region is written out by the
kernel. Views whose readers are all outside stay outside (they are free);
regions without arithmetic are dropped.

Needs: capture (phase, val). Provides: meta[FUSION] = region id on members,
program.notes[FUSION_REGIONS][id] = {"rows", "cols", "phase"}, nodes with origin "fuse".
Changes rounding (decompositions, fp32 math in kernels): mark the Pass exact=False.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch._decomp import get_decompositions
from torch.fx.experimental.proxy_tensor import make_fx

from shardfx.graphs import collectives, meta
from shardfx.graphs.program import FUSION_REGIONS, DistProgram
from shardfx.graphs.rewrite import replace_tuple_node
from shardfx.kernels import rules
from shardfx.kernels.classify import classify, domain_for
from shardfx.kernels.layout import Domain
from shardfx.passes.manager import PassContext, PassResult


def fuse(program: DistProgram, ctx: PassContext, *, decompose: bool = True) -> PassResult:
    decomposed = decompose_composites(program) if decompose else 0
    regions = _group(program)
    notes: dict[int, dict[str, Any]] = {}
    for rid, (domain, phase, members) in enumerate(regions):
        for node in members:
            node.meta[meta.FUSION] = rid
        notes[rid] = {"rows": domain.rows, "cols": domain.cols, "phase": phase}
    program.notes[FUSION_REGIONS] = notes
    fused = sum(len(m) for _, _, m in regions)
    return PassResult(program, {"decomposed": decomposed, "regions": len(regions), "fused_nodes": fused})


# -- decomposition -------------------------------------------------------------------------


def decompose_composites(program: DistProgram) -> int:
    """Replace each composite op of rules.DECOMPOSE by torch's decomposition of it, traced at its shapes."""
    table = get_decompositions(list(rules.DECOMPOSE))
    count = 0
    for node in list(program.graph.nodes):
        if node.op != "call_function" or node.target not in table:
            continue
        _inline_decomposition(program, node, table)
        count += 1
    return count


def _inline_decomposition(program: DistProgram, node: fx.Node, table: dict) -> None:
    graph = program.graph
    tensor_args = [a for a in node.all_input_nodes]
    positions = {a: i for i, a in enumerate(tensor_args)}

    def run(*tensors: Any) -> Any:
        args = fx.map_arg(node.args, lambda a: tensors[positions[a]])
        kwargs = fx.map_arg(node.kwargs, lambda a: tensors[positions[a]])
        return node.target(*args, **kwargs)

    with program.fake_mode, collectives.mesh_sizes(dict(program.mesh.axes)):
        sub = make_fx(run, decomposition_table=table, tracing_mode="real")(*[a.meta["val"] for a in tensor_args])
    env: dict[fx.Node, Any] = {}
    inputs = iter(tensor_args)
    created: list[fx.Node] = []
    outs: list[Any] = []
    with graph.inserting_before(node):
        for sn in sub.graph.nodes:
            if sn.op == "placeholder":
                env[sn] = next(inputs)
            elif sn.op == "output":
                result = sn.args[0]
                outs = list(result) if isinstance(result, (tuple, list)) else [result]
                outs = [fx.map_arg(o, lambda n: env[n]) if o is not None else None for o in outs]
            else:
                new = graph.node_copy(sn, lambda n: env[n])
                new.meta = {"val": sn.meta.get("val")}
                meta.copy_provenance(node, new, "fuse")
                env[sn] = new
                created.append(new)
    if isinstance(node.meta["val"], (tuple, list)):
        replace_tuple_node(node, outs)
    else:
        node.replace_all_uses_with(outs[0])
        graph.erase_node(node)
    # outputs of the decomposition nobody reads, and inputs it does not need (layer norm's
    # backward reads no bias: a gathered bias would be a dead transfer)
    _erase_dead(graph, list(reversed(created)) + tensor_args)


def _erase_dead(graph: fx.Graph, candidates: list[fx.Node]) -> None:
    work = list(candidates)
    while work:
        node = work.pop(0)
        if node.op != "call_function" or node.users or getattr(node, "_erased", False):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        work.extend(inputs)


# -- grouping ----------------------------------------------------------------------------------


class _Regions:
    """Regions being grown, and which regions every node depends on (to refuse cycles)."""

    def __init__(self) -> None:
        self.domain: list[Domain] = []
        self.phase: list[str] = []
        self.members: list[set[fx.Node]] = []
        self.deps: list[set[int]] = []  # regions each region reads from (directly or through outside nodes)
        self.merged_into: dict[int, int] = {}
        self._of: dict[fx.Node, int] = {}
        self.upstream: dict[fx.Node, set[int]] = {}  # for nodes outside regions

    def find(self, rid: int) -> int:
        while rid in self.merged_into:
            rid = self.merged_into[rid]
        return rid

    def of(self, node: fx.Node) -> int | None:
        rid = self._of.get(node)
        return None if rid is None else self.find(rid)

    def upstream_of(self, node: fx.Node) -> set[int]:
        rid = self.of(node)
        if rid is None:
            return {self.find(r) for r in self.upstream.get(node, set())}
        return {rid} | {self.find(r) for r in self.deps[rid]}

    def reaches(self, start: set[int], target: int) -> bool:
        stack, seen = [self.find(r) for r in start], set()
        while stack:
            r = stack.pop()
            if r == target:
                return True
            if r not in seen:
                seen.add(r)
                stack.extend(self.find(d) for d in self.deps[r])
        return False

    def can_join(self, node: fx.Node, rid: int) -> bool:
        if self.phase[rid] != node.meta.get(meta.PHASE):
            return False
        for a in node.all_input_nodes:
            if self.of(a) != rid and self.reaches(self.upstream_of(a), rid):
                return False  # a path leaves the region and comes back: the kernel could not run
        return classify(node, self.domain[rid], self.members[rid]) is not None

    def join(self, node: fx.Node, rid: int) -> None:
        self._of[node] = rid
        self.members[rid].add(node)
        for a in node.all_input_nodes:
            if self.of(a) != rid:
                self.deps[rid] |= self.upstream_of(a)

    def try_merge(self, into: int, other: int) -> bool:
        """Merge two independent regions (neither reads the other) when `other`'s nodes fit `into`'s domain."""
        if self.phase[into] != self.phase[other]:
            return False
        if self.reaches(self.deps[other], into) or self.reaches(self.deps[into], other):
            return False
        union = self.members[into] | self.members[other]
        if any(classify(n, self.domain[into], union) is None for n in self.members[other]):
            return False
        self.members[into] = union
        self.members[other] = set()
        self.deps[into] |= self.deps[other]
        self.merged_into[other] = into
        return True

    def seed(self, node: fx.Node, domain: Domain) -> None:
        self.domain.append(domain)
        self.phase.append(node.meta.get(meta.PHASE))
        self.members.append(set())
        self.deps.append(set())
        self.join(node, len(self.domain) - 1)

    def outside(self, node: fx.Node) -> None:
        up: set[int] = set()
        for a in node.all_input_nodes:
            up |= self.upstream_of(a)
        self.upstream[node] = up


def _group(program: DistProgram) -> list[tuple[Domain, str, list[fx.Node]]]:
    state = _Regions()
    for node in program.graph.nodes:
        if rules.rule(node) is None or meta.PHASE not in node.meta:
            state.outside(node)
            continue
        producers = {state.of(a) for a in node.all_input_nodes} - {None}
        # the largest domain first: smaller row-wise regions (masks, row statistics) merge into it
        ranked = sorted(producers, key=lambda r: (state.domain[r].rows * state.domain[r].cols, r), reverse=True)
        if len(ranked) > 1:
            for other in ranked[1:]:
                state.try_merge(ranked[0], other)
            ranked = [r for r in ranked if state.find(r) == r]
        rid = next((r for r in ranked if state.can_join(node, r)), None)
        if rid is not None:
            state.join(node, rid)
            continue
        domain = domain_for(node)
        if domain is not None and classify(node, domain) is not None:
            state.seed(node, domain)
        else:
            state.outside(node)
    order = {n: i for i, n in enumerate(program.graph.nodes)}
    out: list[tuple[Domain, str, list[fx.Node]]] = []
    for rid, members in enumerate(state.members):
        members = _drop_tail_views(members)
        if not any(rules.RULES[n.target].kind not in (rules.VIEW, rules.GETITEM) for n in members):
            continue  # nothing to compute: views stay as they are
        out.append((state.domain[rid], state.phase[rid], sorted(members, key=order.__getitem__)))
    return out


def _drop_tail_views(members: set[fx.Node]) -> set[fx.Node]:
    """Views (and casts that copy nothing) read only outside stay outside: the kernel writes their input."""
    members = set(members)
    changed = True
    while changed:
        changed = False
        for n in list(members):
            kind = rules.RULES[n.target].kind
            if kind == rules.VIEW and all(u not in members for u in n.users):
                members.discard(n)
                changed = True
    return members
