"""What fusion saves: bytes per region and kernels per step.

Per region: the bytes its kernel moves, the lower bound (every input read
once + every output written once) and what the member ops moved one by one
before fusion (each op reads its operands and writes its result; views are
free). Kernels per step: the compute ops of the graph (views, getitems and
collectives excluded), where a fused region counts one.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.fx as fx

from shardfx.graphs import collectives
from shardfx.graphs.analysis import ALIAS_OPS, tensor_bytes
from shardfx.graphs.program import DistProgram
from shardfx.kernels import rules
from shardfx.kernels.codegen import KernelSpec, traffic


@dataclass(frozen=True)
class RegionReport:
    region: int
    kernel: str
    phase: str
    domain: str
    ops: int  # member ops that compute (views excluded)
    kernel_bytes: int
    lower_bound: int
    unfused_bytes: int

    def row(self) -> str:
        return (
            f"{self.kernel:<12} {self.phase:<9} {self.domain:>11} {self.ops:>4} "
            f"{self.kernel_bytes:>12,} {self.lower_bound:>12,} {self.unfused_bytes:>12,} "
            f"{self.unfused_bytes / max(self.kernel_bytes, 1):>6.2f}x"
        )


HEADER = f"{'kernel':<12} {'phase':<9} {'domain':>11} {'ops':>4} {'kernel B':>12} {'lower B':>12} {'unfused B':>12} {'saved':>7}"


def unfused_bytes(members: list[fx.Node]) -> int:
    """Bytes the member ops move when each runs as its own kernel."""
    total = 0
    for node in members:
        kind = rules.RULES[node.target].kind
        if kind in (rules.VIEW, rules.GETITEM):
            continue
        reads = [] if kind == rules.CONST else node.all_input_nodes
        total += sum(tensor_bytes(a.meta.get("val")) for a in reads) + tensor_bytes(node.meta.get("val"))
    return total


def region_report(region: int, phase: str, spec: KernelSpec, members: list[fx.Node]) -> RegionReport:
    read, written = traffic(spec)
    lower = sum(s.nbytes() for s in spec.inputs) + sum(s.nbytes() for s in spec.outputs)
    ops = sum(rules.RULES[n.target].kind not in (rules.VIEW, rules.GETITEM) for n in members)
    return RegionReport(region, spec.name, phase, str(spec.domain), ops, read + written, lower, unfused_bytes(members))


def kernel_count(program: DistProgram) -> int:
    """Compute kernels one step launches (eager ops + fused regions; views and collectives are not kernels)."""
    count = 0
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem or node.target in ALIAS_OPS:
            continue
        if collectives.is_collective(node) or collectives.is_wait(node):
            continue
        count += 1
    return count


def format_report(reports: list[RegionReport], before: int, after: int) -> str:
    lines = [HEADER, *(r.row() for r in reports)]
    k = sum(r.kernel_bytes for r in reports)
    lb = sum(r.lower_bound for r in reports)
    u = sum(r.unfused_bytes for r in reports)
    lines.append(f"{'total':<12} {'':<9} {'':>11} {'':>4} {k:>12,} {lb:>12,} {u:>12,} {u / max(k, 1):>6.2f}x")
    lines.append(f"kernels per step: {before} before, {after} after ({len(reports)} fused regions)")
    return "\n".join(lines)
