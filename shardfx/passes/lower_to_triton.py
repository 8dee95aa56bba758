"""lower_to_triton: replace each fused region by one generated Triton kernel.

For every region the fuse pass marked, generates a readable Triton kernel
(kernels.codegen), loads it through the on-disk cache (kernels.cache:
keyed by a hash of source and shapes, corrupt entries rebuilt), registers it,
and replaces the region's nodes by one `shardfx.triton_region([inputs], key)`
node and a getitem per value read outside the region. The node sits where the
region's last member was; nodes that read an earlier member's value are moved
after it (a stable topological order: everything else keeps its place).

Needs: fuse (meta[FUSION], program.notes[FUSION_REGIONS]); triton importable (on CPU,
set TRITON_INTERPRET=1 before the first kernel is defined).
Provides: origin "lower_to_triton" nodes, program.notes[TRITON_REGIONS]
(a RegionReport per kernel) and stats: regions, kernels per step before/after, bytes.
"""

from __future__ import annotations

import heapq
import operator
from collections import Counter
from pathlib import Path

import torch
import torch.fx as fx

from shardfx.graphs import meta
from shardfx.graphs.program import FUSION_REGIONS, TRITON_REGIONS, DistProgram
from shardfx.graphs.rewrite import insert_call
from shardfx.kernels import cache
from shardfx.kernels.codegen import generate
from shardfx.kernels.launch import TRITON_REGION, CompiledRegion, register
from shardfx.kernels.layout import Domain
from shardfx.kernels.report import RegionReport, kernel_count, region_report
from shardfx.passes.manager import PassContext, PassResult

SCALAR_TENSOR = torch.ops.aten.scalar_tensor.default


def lower_to_triton(program: DistProgram, ctx: PassContext, *, cache_dir: str | Path | None = None) -> PassResult:
    graph = program.graph
    before = kernel_count(program)
    regions: dict[int, list[fx.Node]] = {}
    for node in graph.nodes:
        rid = node.meta.get(meta.FUSION)
        if rid is not None and node.op == "call_function" and node.target is not TRITON_REGION:
            regions.setdefault(rid, []).append(node)
    notes = program.note(FUSION_REGIONS, "fuse") if regions else {}
    reports: list[RegionReport] = []
    for rid, members in regions.items():
        info = notes[rid]
        domain = Domain(info["rows"], info["cols"])
        modules = Counter(m.meta.get(meta.MODULE) or "-" for m in members)
        title = f"region {rid} ({info['phase']}, {modules.most_common(1)[0][0]}): {len(members)} nodes"
        spec, in_nodes, out_nodes = generate(f"region_{rid}", members, domain, title)
        if not in_nodes or not out_nodes:
            for m in members:
                m.meta.pop(meta.FUSION, None)
            continue
        key, module = cache.load(spec.source, spec.shapes_key(), cache_dir)
        register(key, CompiledRegion(spec, getattr(module, spec.name)))
        reports.append(region_report(rid, info["phase"], spec, members))
        _replace(program, members, in_nodes, out_nodes, key, rid)
    for node in list(graph.nodes):  # constants that kernels now hold as literals
        if node.op == "call_function" and node.target is SCALAR_TENSOR and not node.users:
            graph.erase_node(node)
    _stable_toposort(graph)
    after = kernel_count(program)
    program.notes[TRITON_REGIONS] = reports
    stats = {
        "kernels": len(reports),
        "kernels_per_step_before": before,
        "kernels_per_step_after": after,
        "kernel_bytes": sum(r.kernel_bytes for r in reports),
        "lower_bound_bytes": sum(r.lower_bound for r in reports),
        "unfused_bytes": sum(r.unfused_bytes for r in reports),
        "cache_hits": cache.STATS.hits,
        "cache_rebuilt": cache.STATS.rebuilt,
    }
    ctx.log(f"lower_to_triton: {len(reports)} kernels; kernels per step {before} -> {after}")
    return PassResult(program, stats)


def _replace(
    program: DistProgram, members: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node], key: str, rid: int
) -> None:
    graph = program.graph
    last = members[-1]
    with graph.inserting_after(last):
        call = insert_call(program, TRITON_REGION, (inputs, key), provenance=last, origin="lower_to_triton")
    call.meta[meta.FUSION] = rid
    prev = call
    for j, out in enumerate(outputs):
        with graph.inserting_after(prev):
            item = graph.call_function(operator.getitem, (call, j))
        item.meta["val"] = call.meta["val"][j]
        meta.copy_provenance(out, item, "lower_to_triton")
        item.meta[meta.FUSION] = rid
        out.replace_all_uses_with(item)
        prev = item
    for m in reversed(members):
        graph.erase_node(m)


def _stable_toposort(graph: fx.Graph) -> None:
    """Order nodes so every node follows its inputs, moving as few as possible from where they are."""
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    waiting = {n: len(set(n.all_input_nodes)) for n in nodes}
    ready = [(index[n], n.name) for n in nodes if waiting[n] == 0]
    by_name = {n.name: n for n in nodes}
    heapq.heapify(ready)
    order: list[fx.Node] = []
    while ready:
        _, name = heapq.heappop(ready)
        node = by_name[name]
        order.append(node)
        for user in node.users:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, (index[user], user.name))
    assert len(order) == len(nodes), "the graph has a cycle after lowering"
    if order == nodes:
        return
    prev = order[0]
    for node in order[1:]:
        prev.append(node)
        prev = node
