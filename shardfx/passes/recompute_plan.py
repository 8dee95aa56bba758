"""The recompute "budget" policy's chooser: which forward values to recompute, scored on the true peak.

A plan is a set S of recompute units (an allocation and the views / getitems that go with it, see
recompute._unit). `RecomputeModel` predicts, without touching the graph, the program that applying S
gives and its liveness timeline -- the same rule as graphs.analysis.memory_timeline, on the same
node order -- so thousands of candidate sets can be scored on the peak they really reach:

- the copy of a unit is placed right before its first reader in the backward (a backward node, or
  the copy of a later recomputed unit); copies before the same node run in forward order;
- a backward read of a recomputed value reads its copy; a copy reads the copies of recomputed
  inputs and the kept forward value of every other input (whose lifetime so extends);
- a forward node that only the backward read dies (dead-code elimination), and so may its inputs.

`apply_plan` then builds exactly that program, so the peak the search saw is the peak the pass
reports (checked there).

`choose_plan` minimises the added compute (roofline seconds of the copies on the profile) subject
to peak <= target, by local search on that exact peak:
1. starts: a greedy that repeatedly adds the move with the most *excess* (bytes over the target,
   summed over the timeline) removed per added second -- a move is one unit, or a unit with the
   chain of recomputable inputs the backward does not keep, so `add(x, mm(y))` can be recomputed
   from a kept y rather than a kept mm(y) -- and the first prefix of the old order (added time per
   byte freed) that meets the target;
2. prune: drop chosen units, most expensive first, while the peak stays within the target;
3. swap in: add one move, drop what it makes unneeded, refill with cheaper moves when that is what
   closes the last bytes (the knapsack end: four GELUs and an arange, not three GELUs and four
   layer norms); swap out: drop one unit, refill with strictly cheaper moves. Repeat while cheaper.
Deterministic (ties break on graph order). Cost: one evaluation is O(nodes + edges) (numpy); the
search makes at most 12 evaluations per candidate unit (800 in all) beyond O(candidates) for the
ordered prefix and the prunes, memoised.
"""

from __future__ import annotations

import heapq
import operator
from dataclasses import dataclass

import numpy as np
import torch.fx as fx

from shardfx.graphs import collectives, meta
from shardfx.graphs.analysis import storage_owner, tensor_bytes
from shardfx.graphs.cost_model import compute_seconds, hardware
from shardfx.graphs.program import DistProgram

ORIGIN = "recompute"


@dataclass
class Evaluation:
    peak: int
    excess: float  # bytes over the target, summed over the timeline
    cost: float  # added seconds
    at_peak: frozenset[int] = frozenset()  # candidate units whose kept forward value is live at the peak


class RecomputeModel:
    """The program's liveness as a function of the recompute set (indices are graph positions)."""

    def __init__(self, program: DistProgram, candidates: dict[fx.Node, list[fx.Node]], hw: str) -> None:
        """`candidates`: each recomputable unit and its members (the unit, and the views and getitems
        that go with it)."""
        self.program = program
        nodes = [n for n in program.graph.nodes]
        self.nodes = nodes
        index = {n: i for i, n in enumerate(nodes)}
        self.index = index
        n_nodes = len(nodes)
        owner = [index[storage_owner(n)] if n.op != "output" else i for i, n in enumerate(nodes)]
        self.owner = owner
        self.backward = [n.op != "output" and n.op != "placeholder" and meta.phase(n) == meta.BACKWARD for n in nodes]
        forward = [n.op == "call_function" and meta.phase(n) == meta.FORWARD for n in nodes]
        self.forward = forward
        multi = [n.op == "call_function" and isinstance(n.meta.get("val"), (tuple, list)) for n in nodes]
        self.size = [0] * n_nodes
        for i, n in enumerate(nodes):
            if n.op != "output" and owner[i] == i and not multi[i]:
                self.size[i] = tensor_bytes(n.meta.get("val"))
        self.held = sum(self.size[i] for i, n in enumerate(nodes) if n.op == "placeholder")
        self.placeholder = [n.op == "placeholder" for n in nodes]
        self.returned = {owner[index[o]] for o in program.outputs()}
        # what each node reads, as storage owners (a wait also reads what its start reads)
        self.reads: list[list[int]] = []
        self.users: list[list[int]] = [[] for _ in nodes]
        for i, n in enumerate(nodes):
            args = list(n.all_input_nodes)
            for a in args:
                self.users[index[a]].append(i)
            if collectives.is_wait(n):
                args += n.args[0].all_input_nodes
            self.reads.append(sorted({owner[index[a]] for a in args}))
        self.impure = [n.op in ("placeholder", "output") or n.is_impure() for n in nodes]
        # multi-output ops: (bytes, getitem positions) per element
        self.elements: dict[int, list[tuple[int, list[int]]]] = {}
        for i, n in enumerate(nodes):
            if multi[i]:
                picks = [u for u in n.users if u.target is operator.getitem]
                self.elements[i] = [
                    (tensor_bytes(v), [index[u] for u in picks if u.args[1] == k]) for k, v in enumerate(n.meta["val"])
                ]
        # units
        self.units = [index[u] for u in candidates]
        self.unit_of: dict[int, int] = {}  # forward node -> the candidate unit it belongs to
        self.members: dict[int, list[int]] = {}
        for u, unit_members in candidates.items():
            ms = sorted(index[m] for m in unit_members)
            self.members[index[u]] = ms
            for m in ms:
                self.unit_of[m] = index[u]
        # reads of each unit's members by the backward, and by other units' compute nodes
        self.first_bw: dict[int, int] = {}
        self.bw_read: dict[int, list[int]] = {}
        self.unit_inputs: dict[int, list[tuple[int, int]]] = {}  # unit -> (input node, its unit) for candidate inputs
        for u in self.units:
            read = [m for m in self.members[u] if any(self.backward[x] for x in self.users[m])]
            self.bw_read[u] = read
            firsts = [x for m in read for x in self.users[m] if self.backward[x]]
            self.first_bw[u] = min(firsts) if firsts else n_nodes
            ins = []
            for a in nodes[u].all_input_nodes:
                ai = index[a]
                w = self.unit_of.get(ai)
                if w is not None and w != u:
                    ins.append((ai, w))
            self.unit_inputs[u] = ins
        self.size2 = np.asarray(self.size + self.size, dtype=np.float64)  # originals, then copies
        self.freeable = np.ones(2 * n_nodes, dtype=bool)  # returned values stay to the end
        self.freeable[list(self.returned)] = False
        self.edge_reader = np.asarray([i for i, rs in enumerate(self.reads) for _ in rs], dtype=np.int64)
        self.edge_storage = np.asarray([r for rs in self.reads for r in rs], dtype=np.int64)
        self.edge_backward = np.asarray(self.backward, dtype=bool)[self.edge_reader]
        self.allocates = np.asarray(
            [bool(self.size[i]) and not self.placeholder[i] for i in range(n_nodes)], dtype=bool
        )
        self.alloc_bytes = np.asarray(self.size, dtype=np.float64)
        self.inputs_pos = [[index[a] for a in n.all_input_nodes] for n in nodes]
        # what a unit's copy reads outside the unit: (input position, the unit it belongs to or None)
        self.inputs_of = {u: [(a, self.unit_of.get(a)) for a in self.inputs_pos[u]] for u in self.units}
        # the storages of the candidates' forward values (a multi-output op's are its getitems)
        self.unit_parts = np.asarray(
            sorted(m for u in self.units for m in self.members[u] if owner[m] == m and self.size[m]), dtype=np.int64
        )
        profile = hardware(hw, ranks=program.mesh.world_size)
        # a unit's cost is its op's (the search's unit of account); the copies' views and getitems
        # the plan also builds are priced in evaluate()
        self.node_cost = {m: compute_seconds(nodes[m], profile) for u in self.units for m in self.members[u]}
        self.cost = {u: self.node_cost[u] for u in self.units}
        # the move that recomputes a unit from kept values: it and its candidate inputs the backward does not read
        self.chain: dict[int, frozenset[int]] = {}
        for u in self.units:
            chain, frontier = {u}, [u]
            while frontier:
                for _a, w in self.unit_inputs[frontier.pop()]:
                    if w not in chain and not self.bw_read[w]:
                        chain.add(w)
                        frontier.append(w)
            self.chain[u] = frozenset(chain)

    # ------------------------------------------------------------------ the plan for a set

    def plan(self, chosen: frozenset[int]) -> dict[int, tuple[int, list[int]]]:
        """unit -> (anchor: the node its copies go before, the members copied, in graph order)."""
        result: dict[int, tuple[int, list[int]]] = {}
        direct: dict[int, set[int]] = {u: set(self.bw_read[u]) for u in chosen}
        anchor: dict[int, int] = {u: self.first_bw[u] for u in chosen}
        for u in sorted(chosen, reverse=True):  # a unit's readers come later in graph order
            need = direct[u]
            if not need:
                continue
            members = self.members[u]
            keep = set()
            for m in need:  # a copied member needs the copies of its bases
                while m not in keep:
                    keep.add(m)
                    if m == u:
                        break
                    m = self.index[self.nodes[m].args[0]]
            copied = [m for m in members if m in keep]
            result[u] = (anchor[u], copied)
            for a, w in self.unit_inputs[u]:
                if w in chosen:
                    direct[w].add(a)
                    anchor[w] = min(anchor[w], anchor[u])
        return result

    def evaluate(self, chosen: frozenset[int], target: float) -> Evaluation:
        """The peak, the excess over `target` and the added seconds of the program `chosen` gives."""
        plan = self.plan(chosen)
        n_nodes = len(self.nodes)
        owner, size, reads, users, backward = self.owner, self.size, self.reads, self.users, self.backward
        copied: set[int] = set()  # original storages that have a copy (storage id n_nodes + owner)
        copy_reads: set[int] = set()  # original nodes a copy reads: they stay alive
        groups: dict[int, list[int]] = {}
        for u, (anchor, members) in plan.items():
            groups.setdefault(anchor, []).append(u)
            copied.update(m for m in members if owner[m] == m)
            copy_reads.update(a for a, w in self.inputs_of[u] if w not in plan)
        for group in groups.values():
            group.sort()
        # dead-code elimination: a forward node dies when no live node reads it other than a
        # backward node that now reads its copy; only the recomputed members and their inputs can
        redirected = {m for u in chosen for m in self.members[u]}
        dead: set[int] = set()
        work = [-i for i in redirected]  # a max-heap of positions: a node's readers are decided first
        heapq.heapify(work)
        seen = set(redirected)
        while work:
            i = -heapq.heappop(work)
            if self.impure[i] or i in copy_reads:
                continue
            red = i in redirected
            if any(x not in dead and not (red and backward[x]) for x in users[i]):
                continue
            dead.add(i)
            for a in self.inputs_pos[i]:
                if self.forward[a] and a not in seen:
                    seen.add(a)
                    heapq.heappush(work, -a)
        # positions: the copies of a group, then its anchor (when it lives)
        alive = np.ones(n_nodes, dtype=bool)
        alive[list(dead)] = False
        inserted = np.zeros(n_nodes, dtype=np.int64)
        for anchor, group in groups.items():
            inserted[anchor] = sum(len(plan[u][1]) for u in group)
        slots = inserted + alive
        start = np.cumsum(slots) - slots
        at = start + inserted  # where each original node runs
        length = int(slots.sum())
        # the copies' allocations and reads
        c_sid, c_pos, r_sid, r_pos, t_pos, t_bytes = [], [], [], [], [], []
        for anchor, group in groups.items():
            p = int(start[anchor])
            for u in group:
                members = plan[u][1]
                for m in members:
                    if m == u:
                        for r in reads[u]:
                            r_sid.append(n_nodes + r if r in copied else r)
                            r_pos.append(p)
                        if u in self.elements:
                            kept = set(members)
                            t_pos.append(p)
                            t_bytes.append(sum(b for b, picks in self.elements[u] if not any(x in kept for x in picks)))
                    if owner[m] == m and size[m]:
                        c_sid.append(n_nodes + m)
                        c_pos.append(p)
                    p += 1
        for i, elements in self.elements.items():
            if alive[i]:
                t_pos.append(int(at[i]))
                t_bytes.append(sum(b for b, picks in elements if all(x in dead for x in picks)))
        # the originals' reads: a backward read of a copied storage reads the copy
        copied_mask = np.zeros(n_nodes, dtype=bool)
        copied_mask[list(copied)] = True
        live_edge = alive[self.edge_reader]
        storage = self.edge_storage[live_edge]
        storage = storage + n_nodes * (self.edge_backward[live_edge] & copied_mask[storage])
        born = np.zeros(2 * n_nodes, dtype=bool)
        made = alive & self.allocates
        born[np.flatnonzero(made)] = True
        born[c_sid] = True
        last = np.full(2 * n_nodes, -1, dtype=np.int64)
        last[np.flatnonzero(made)] = at[made]
        last[c_sid] = c_pos
        np.maximum.at(
            last,
            np.concatenate((storage, np.asarray(r_sid, dtype=np.int64))),
            np.concatenate((at[self.edge_reader[live_edge]], np.asarray(r_pos, dtype=np.int64))),
        )
        # the sweep, as memory_timeline: allocate at a node, free after its storage's last read
        allocs = np.bincount(at[made], weights=self.alloc_bytes[made], minlength=length)
        allocs += np.bincount(np.asarray(c_pos, dtype=np.int64), weights=self.size2[c_sid], minlength=length)
        freed = born & self.freeable
        frees = np.bincount(last[freed], weights=self.size2[freed], minlength=length)
        transient = np.bincount(
            np.asarray(t_pos, dtype=np.int64), weights=np.asarray(t_bytes, dtype=np.float64), minlength=length
        )
        live = self.held + np.cumsum(allocs) - (np.cumsum(frees) - frees) + transient
        peak = int(max(live.max(initial=0.0), self.held))
        excess = float(np.clip(live - target, 0.0, None).sum())
        cost = sum(self.node_cost[m] for _, copied in plan.values() for m in copied)
        # only recomputing a value live at the peak can lower it
        p = int(live.argmax()) if length else 0
        parts = self.unit_parts
        live_parts = parts[born[parts] & (at[parts] <= p) & (last[parts] >= p)]
        at_peak = frozenset(self.unit_of[int(i)] for i in live_parts)
        return Evaluation(peak, excess, cost, at_peak)


def apply_plan(model: RecomputeModel, chosen: frozenset[int]) -> list[fx.Node]:
    """Build the program `model.evaluate(chosen)` predicts; returns the copies, in graph order."""
    plan = model.plan(chosen)
    nodes, graph = model.nodes, model.program.graph
    copies: dict[fx.Node, fx.Node] = {}
    for u in sorted(plan, key=lambda u: (plan[u][0], u)):
        anchor, copied = plan[u]
        for m in copied:
            node = nodes[m]
            with graph.inserting_before(nodes[anchor]):
                copy = graph.node_copy(node, lambda a: copies.get(a, a))
            copy.meta = dict(node.meta)
            copy.meta[meta.PHASE] = meta.BACKWARD
            copy.meta[meta.ORIGIN] = ORIGIN
            copy.meta[meta.RECOMPUTE] = True
            copies[node] = copy
    for i, node in enumerate(nodes):
        if model.backward[i]:
            for a in node.all_input_nodes:
                if a in copies:
                    node.replace_input_with(a, copies[a])
    graph.eliminate_dead_code()
    return list(copies.values())


class _Search:
    """Greedy, prune and swaps over recompute sets (see the module docstring), memoised."""

    def __init__(self, model: RecomputeModel, target: float, evaluations: int) -> None:
        self.model, self.target, self.evaluations = model, target, evaluations
        self.memo: dict[frozenset[int], Evaluation] = {}
        moves = {frozenset([u]) for u in model.units} | set(model.chain.values())
        self.moves = sorted(moves, key=lambda m: (self.cost(m), sorted(m)))

    def eval(self, chosen: frozenset[int]) -> Evaluation:
        if chosen not in self.memo:
            self.memo[chosen] = self.model.evaluate(chosen, self.target)
        return self.memo[chosen]

    def spent(self) -> bool:
        return len(self.memo) >= self.evaluations

    def cost(self, chosen: frozenset[int]) -> float:
        return sum(self.model.cost[u] for u in chosen)

    def feasible(self, chosen: frozenset[int]) -> bool:
        return self.eval(chosen).peak <= self.target

    def greedy(self, chosen: frozenset[int], limit: float = float("inf"), focus: bool = False) -> frozenset[int]:
        """Add moves (together adding less than `limit` seconds) by excess removed per second until feasible;
        a move that removes nothing is scored again only after the others run out. `focus`: only
        moves that recompute a value live at the peak (for a set a few bytes over the target)."""
        current = self.eval(chosen)
        spend = self.cost(chosen) + limit  # what the whole refill may cost
        while current.peak > self.target and self.cost(chosen) < spend:
            at_peak = current.at_peak if focus else None
            heap = [
                (-float("inf"), k, -1)
                for k, m in enumerate(self.moves)
                if self.cost(m - chosen) < limit and (at_peak is None or (m - chosen) & at_peak)
            ]
            heapq.heapify(heap)
            start, step = chosen, 0
            while current.peak > self.target and heap and self.cost(chosen) < spend and not self.spent():
                _score, k, stamp = heapq.heappop(heap)
                move = self.moves[k]
                if move <= chosen:
                    continue
                if stamp != step:  # stale: score it against the current set
                    gain = current.excess - self.eval(chosen | move).excess
                    if gain > 0:
                        heapq.heappush(heap, (-gain / max(self.cost(move - chosen), 1e-12), k, step))
                    continue
                chosen = chosen | move
                current = self.eval(chosen)
                step += 1
            if chosen == start:
                break
        return chosen

    def prune(self, chosen: frozenset[int], among: frozenset[int] | None = None, gain: float = 0.0) -> frozenset[int]:
        """Drop units of `among` (default all), most expensive first, while the peak stays within the
        target; give up early once what is left to drop cannot save more than `gain` seconds."""
        order = sorted(among if among is not None else chosen, key=lambda u: (-self.model.cost[u], u))
        left = sum(self.model.cost[u] for u in order)
        saved = 0.0
        for u in order:
            if saved + left <= gain:
                break
            left -= self.model.cost[u]
            if self.feasible(chosen - {u}):
                chosen = chosen - {u}
                saved += self.model.cost[u]
        return chosen

    def swap_in(self, chosen: frozenset[int]) -> frozenset[int]:
        """One move in, then out what it makes unneeded (refilled with cheaper moves if that helps)."""
        for move in self.moves:
            extra = self.cost(move - chosen)
            if move <= chosen or extra >= self.cost(chosen) or self.spent():
                continue
            if not (move - chosen) & self.eval(chosen).at_peak:
                continue  # it frees nothing at the peak: nothing else can go
            if self.eval(chosen | move).peak >= self.eval(chosen).peak:
                continue
            # what goes: the most expensive first, or only what is cheaper than the move (so a unit of
            # the move's own cost is not swapped for it at no gain); then the knapsack's last bytes
            chosen = self._swap(chosen, move, extra)
        return chosen

    def _swap(self, chosen: frozenset[int], move: frozenset[int], extra: float) -> frozenset[int]:
        bound = self.cost(chosen)
        trials = []
        for among in (chosen - move, frozenset(u for u in chosen - move if self.model.cost[u] < extra)):
            trial = self.prune(chosen | move, among=among, gain=extra)
            if self.feasible(trial) and self.cost(trial) < bound:
                return trial
            trials.append(trial)
        for trial in trials:
            if self.feasible(trial):
                trial = self.refill(trial, move, bound)
                if self.feasible(trial) and self.cost(trial) < bound:
                    return trial
        return chosen

    def swap_out(self, chosen: frozenset[int]) -> frozenset[int]:
        """One unit out, strictly cheaper moves in."""
        for u in sorted(chosen, key=lambda u: (-self.model.cost[u], u)):
            if u not in chosen or self.spent():
                continue
            trial = self.greedy(chosen - {u}, limit=self.model.cost[u], focus=True)
            if self.feasible(trial):
                trial = self.prune(trial)
                if self.cost(trial) < self.cost(chosen):
                    chosen = trial
        return chosen

    def refill(self, chosen: frozenset[int], move: frozenset[int], bound: float) -> frozenset[int]:
        """A unit out of `chosen` (not of `move`, and cheaper than it), moves in that keep the total
        under `bound` (the knapsack's last bytes)."""
        total, extra = self.cost(chosen), self.cost(move)
        for u in sorted(chosen - move, key=lambda u: (-self.model.cost[u], u)):
            room = bound - (total - self.model.cost[u])
            if room <= 0 or self.model.cost[u] >= extra or self.spent():
                continue
            trial = self.greedy(chosen - {u}, limit=min(room, self.model.cost[u]), focus=True)
            if self.feasible(trial) and self.cost(trial) < bound:
                return trial
        return chosen

    def improve(self, chosen: frozenset[int]) -> frozenset[int]:
        chosen = self.prune(chosen)
        while not self.spent():
            better = self.swap_in(chosen)
            if self.cost(better) >= self.cost(chosen):
                better = self.swap_out(chosen)
            if self.cost(better) >= self.cost(chosen):
                break
            chosen = better
        return chosen

    def descend(self, chosen: frozenset[int], steps: int = 8) -> frozenset[int]:
        """Add the move that lowers the peak most, while one does (at most `steps` times)."""
        for _ in range(steps):
            at_peak = self.eval(chosen).at_peak
            tries = [(self.eval(chosen | m).peak, k) for k, m in enumerate(self.moves) if (m - chosen) & at_peak]
            if not tries:
                break
            peak, k = min(tries)
            if peak >= self.eval(chosen).peak:
                break
            chosen = chosen | self.moves[k]
        return chosen

    def in_order(self, order: list[int]) -> tuple[frozenset[int], Evaluation]:
        """The first prefix of `order` that meets the target, else the prefix with the lowest peak."""
        chosen: frozenset[int] = frozenset()
        best = (chosen, self.eval(chosen))
        for u in order:
            chosen = chosen | {u}
            evaluation = self.eval(chosen)
            if evaluation.peak <= self.target:
                return chosen, evaluation
            if evaluation.peak < best[1].peak:
                best = (chosen, evaluation)
        return best


def choose_plan(
    model: RecomputeModel, target: float, order: list[int], evaluations: int | None = None
) -> tuple[frozenset[int], Evaluation]:
    """The cheapest recompute set found whose peak is at most `target`.

    Starts from the greedy above and from the first prefix of `order` (units by added time per byte
    freed) that meets the target; improves each, keeps the cheaper. When neither reaches the target:
    the lowest peak found from the prefix of `order` with the lowest peak by adding the moves that
    lower it most (`descend`; the same whatever the target, so a budget at that peak is then met).
    `evaluations` bounds the timelines the greedy and the swaps simulate (default 12 per candidate,
    at most 800: past that the greedy stops and the ordered prefix is the start)."""
    search = _Search(model, target, evaluations if evaluations is not None else min(12 * len(model.units), 800))
    seeds = [search.greedy(frozenset()), search.in_order(order)[0]]
    feasible = [s for s in seeds if search.feasible(s)]
    if not feasible:  # the lowest peak known, found the same way whatever the target
        lowest = search.descend(search.in_order(order)[0])
        if not search.feasible(lowest):
            return lowest, search.eval(lowest)
        feasible = [lowest]
    feasible = sorted((search.prune(s) for s in feasible), key=lambda s: (search.cost(s), sorted(s)))
    improved = [search.improve(s) for s in feasible]  # the cheaper start first: it gets the evaluations
    chosen = min(improved, key=lambda s: (search.cost(s), search.eval(s).peak, sorted(s)))
    return chosen, search.eval(chosen)
