"""recompute: drop forward values after the forward and compute them again right before the backward needs them.

A value the backward reads is normally kept from the forward to the backward.
Recomputing it instead: every backward read of forward node `s` is pointed at a
copy of `s` placed right before the first of those reads (phase backward,
origin "recompute", meta[RECOMPUTE]=True); the forward `s` is then freed after
its last forward use. A copy's inputs are the kept forward values, parameters,
or copies of other recomputed nodes. Random ops and collectives are never
recomputed, so results are bit-identical.

Policies:
- "full": every node of every block (module path `blocks.3...`) except the
  block's outputs (what later blocks read), as torch.utils.checkpoint per block;
- "selective": the attention core (Megatron-LM's recipe): the attention op and
  what it alone feeds;
- "budget": the cheapest recompute set found (added roofline time on the
  profile, so memory-bound recompute is not free) whose simulated peak is at
  most the budget: every recomputable forward allocation is a candidate, sets
  are scored on the exact liveness timeline they give and searched by greedy +
  prune + swaps (passes/recompute_plan.py). Deterministic; the peak is always
  within the budget, but a smaller budget need not recompute a superset.

Runs before the sharding pass, so a ZeRO-3 backward gather serves the copies.
Needs: capture phases and module paths. Provides: meta[RECOMPUTE].
"""

from __future__ import annotations

import operator

import torch.fx as fx

from shardfx.errors import PassError
from shardfx.graphs import meta, ops
from shardfx.graphs.analysis import ALIAS_OPS, memory_timeline, storage_owner, tensor_bytes
from shardfx.graphs.cost_model import compute_seconds, hardware
from shardfx.graphs.program import DistProgram
from shardfx.passes.bucket_collectives import block_of
from shardfx.passes.manager import PassContext, PassResult
from shardfx.passes.recompute_plan import RecomputeModel, apply_plan, choose_plan

ORIGIN = "recompute"
MATMUL_LIKE = ops.of_kind(ops.MATMUL, ops.ATTENTION)  # recomputed last: the most time per byte freed
ATTENTION = frozenset(op for op in ops.of_kind(ops.ATTENTION) if not ops.attention(op).backward)


class BudgetUnreachable(ValueError):
    """The memory budget is below the lowest peak recomputation can reach."""


def recomputable(node: fx.Node) -> bool:
    """A forward node that may run again with bit-identical results (graphs.ops.recomputable)."""
    if node.op != "call_function" or meta.phase(node) != meta.FORWARD:
        return False
    if node.target is operator.getitem:
        return recomputable(node.args[0])
    return ops.recomputable(node)


def _unit(node: fx.Node) -> fx.Node:
    """The node a recompute decision is made for: the allocation a value lives in (a view stands
    for its base, a getitem for its multi-output op)."""
    owner = storage_owner(node)
    return owner.args[0] if owner.target is operator.getitem else owner


def _members(unit: fx.Node) -> list[fx.Node]:
    """The unit and the forward nodes that only view it or pick from it: they go with it."""
    members = [unit]
    frontier = [unit]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if (
                user.op == "call_function"
                and (user.target in ALIAS_OPS or user.target is operator.getitem)
                and user.args[0] is node
                and meta.phase(user) == meta.FORWARD
                and user not in members
            ):
                members.append(user)
                frontier.append(user)
    return members


def saved_values(program: DistProgram) -> list[fx.Node]:
    """Forward nodes the backward reads directly, in graph order."""
    return [
        n
        for n in program.graph.nodes
        if n.op == "call_function"
        and meta.phase(n) == meta.FORWARD
        and any(meta.phase(u) == meta.BACKWARD for u in n.users if u.op != "output")
    ]


class Recomputer:
    """Applies recompute decisions to a program one node at a time (so peaks can be checked as it goes)."""

    def __init__(self, program: DistProgram) -> None:
        self.program = program
        self.copies: dict[fx.Node, fx.Node] = {}
        self.chosen: set[fx.Node] = set()
        self.recomputed: set[fx.Node] = set()  # every member of a chosen unit
        self.added_nodes = 0

    def _order(self) -> dict[fx.Node, int]:
        return {n: i for i, n in enumerate(self.program.graph.nodes)}

    def recompute(self, unit: fx.Node) -> None:
        """Point every backward read of `unit` (and of its getitems / views) at a copy made before the first."""
        if unit in self.chosen:
            return
        self.chosen.add(unit)
        members = _members(unit)
        self.recomputed.update(members)
        reads = [(u, m) for m in members for u in list(m.users) if u.op != "output" and meta.phase(u) == meta.BACKWARD]
        if not reads:
            return
        order = self._order()
        first = min((u for u, _ in reads), key=order.__getitem__)
        for user, member in reads:
            user.replace_input_with(member, self._copy(member, first))

    def _copy(self, node: fx.Node, before: fx.Node) -> fx.Node:
        """The backward copy of a recomputed forward node, placed before `before` (or earlier if it exists)."""
        if node in self.copies:
            copy = self.copies[node]
            order = self._order()
            if order[copy] > order[before]:
                self._hoist(copy, before)
            return copy
        args_map: dict[fx.Node, fx.Node] = {}
        for arg in node.all_input_nodes:
            if arg in self.recomputed:
                args_map[arg] = self._copy(arg, before)
        graph = self.program.graph
        with graph.inserting_before(before):
            copy = graph.node_copy(node, lambda n: args_map.get(n, n))
        copy.meta = dict(node.meta)
        copy.meta[meta.PHASE] = meta.BACKWARD
        copy.meta[meta.ORIGIN] = ORIGIN
        copy.meta[meta.RECOMPUTE] = True
        self.copies[node] = copy
        self.added_nodes += 1
        return copy

    def _hoist(self, node: fx.Node, before: fx.Node) -> None:
        for arg in node.all_input_nodes:
            order = self._order()
            if order[arg] > order[before]:
                self._hoist(arg, before)
        before.prepend(node)


def _full_units(program: DistProgram) -> list[fx.Node]:
    units = []
    for node in saved_values(program):
        unit = _unit(node)
        block = block_of(unit.meta.get(meta.MODULE, ""))
        if not recomputable(unit) or not any(ch.isdigit() for ch in block):
            continue
        # a block's outputs (read by the forward outside the block) are its checkpoints: kept
        leaves_block = any(
            meta.phase(u) == meta.FORWARD and block_of(u.meta.get(meta.MODULE, "")) != block
            for m in [unit, *unit.users]
            for u in (m.users if m is not unit else unit.users)
            if u.op != "output"
        )
        if not leaves_block and unit not in units:
            units.append(unit)
    return units


def _selective_units(program: DistProgram) -> list[fx.Node]:
    return [n for n in program.graph.nodes if n.op == "call_function" and n.target in ATTENTION and recomputable(n)]


def _budget_order(program: DistProgram, hw_name: str) -> list[fx.Node]:
    """Candidates, cheapest added time per byte freed first; matmul-like outputs after all others."""
    hw = hardware(hw_name, ranks=program.mesh.world_size)
    order = {n: i for i, n in enumerate(program.graph.nodes)}
    scored = []
    seen: set[fx.Node] = set()
    for node in saved_values(program):
        unit = _unit(node)
        if unit in seen or unit.op != "call_function" or not recomputable(unit):
            continue
        seen.add(unit)
        freed = tensor_bytes(unit.meta.get("val"))
        if freed == 0:
            continue
        seconds = compute_seconds(unit, hw)
        scored.append((unit.target in MATMUL_LIKE, seconds / freed, order[unit], unit))
    return [unit for *_, unit in sorted(scored, key=lambda t: t[:3])]


def budget_candidates(program: DistProgram) -> dict[fx.Node, list[fx.Node]]:
    """Every recomputable forward allocation (with its members), in graph order: what the budget
    policy chooses among."""
    units: dict[fx.Node, list[fx.Node]] = {}
    for node in program.graph.nodes:
        if node.op == "call_function" and meta.phase(node) == meta.FORWARD:
            unit = _unit(node)
            if unit.op == "call_function" and unit not in units and recomputable(unit):
                units[unit] = _members(unit)
    return units


def _recompute_budget(program: DistProgram, target: float, hw: str, before: int) -> list[fx.Node]:
    model = RecomputeModel(program, budget_candidates(program), hw)
    order = [model.index[u] for u in _budget_order(program, hw)]
    chosen, evaluation = choose_plan(model, target, order)
    if evaluation.peak > target:
        raise BudgetUnreachable(
            f"memory budget {target / 2**20:.2f} MiB is below the lowest peak recomputation reaches "
            f"({evaluation.peak / 2**20:.2f} MiB; {before / 2**20:.2f} MiB without recomputation)"
        )
    copies = apply_plan(model, chosen)
    peak = memory_timeline(program).peak
    if peak > target:  # the model and the program disagree: never hand back a program over the budget
        raise PassError(
            f"recompute: the chosen set leaves a peak of {peak / 2**20:.2f} MiB, over the budget of "
            f"{target / 2**20:.2f} MiB (its model predicted {evaluation.peak / 2**20:.2f} MiB); this is a "
            "shardfx bug: please report it; recompute='full' avoids it"
        )
    return copies


def recompute(
    program: DistProgram, ctx: PassContext, *, policy: str, budget: float | None = None, hw: str = "cpu"
) -> PassResult:
    before = memory_timeline(program).peak
    recomputer = Recomputer(program)
    if policy == "full":
        for unit in _full_units(program):
            recomputer.recompute(unit)
    elif policy == "selective":
        for unit in _selective_units(program):
            recomputer.recompute(unit)
    elif policy == "budget":
        assert budget is not None
        copies = _recompute_budget(program, budget if budget > 1 else budget * before, hw, before)
    elif policy != "none":
        raise ValueError(f"recompute policy {policy!r} is not one of none, full, selective, budget")
    if policy != "budget":
        program.graph.eliminate_dead_code()
        copies = list(recomputer.copies.values())
    after = memory_timeline(program).peak
    hw_profile = hardware(hw, ranks=program.mesh.world_size)
    added = sum(compute_seconds(c, hw_profile) for c in copies)
    return PassResult(
        program,
        {
            "peak_before": before,
            "peak_after": after,
            "recomputed_nodes": len(copies),
            "added_seconds": added,
        },
    )
