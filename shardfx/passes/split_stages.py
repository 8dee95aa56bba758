"""split_stages: keep one pipeline stage of the step, with sends and receives where values cross.

The captured joint graph (forward and backward of the whole model) is cut into
`stages` pieces; this pass keeps the nodes of one of them (`stage`), so the
pipeline runs once per stage on its own copy of the capture and every later
pass (ZeRO, recompute, bucketing) sees one ordinary stage program.

Where the cuts go (`plan_stages`, the same on every copy):
- Forward nodes are cut by position in the forward order, only where a block
  begins (a module path with an index in it, such as `blocks.3` or
  `model.layers.7`). `split` names the modules that begin stages 1..P-1;
  without it the cost model's seconds (forward plus the backward nodes that
  belong to each forward node) are balanced: the cut that minimises the
  slowest stage.
- A backward node belongs to the stage of the forward node autograd made it
  for (the `seq_nr` torch records on both), moved where its inputs force it:
  never above a stage whose forward value it reads (forward values travel
  forward in time), never below a stage whose gradient it reads (gradients
  travel backward). Unattributed nodes (the sums of gradients autograd adds)
  go to the lowest stage of the gradients they read.

What crosses a cut: every value one stage computes and another reads becomes
`shardfx.send(x, axis="pp", peer=+k)` right after it on the producing stage and
`shardfx.recv(shape, dtype, device, axis="pp", peer=-k)` at the same place on
the reading one, so each pair of stages sends and receives in one order (the
order of the captured graph). A forward value is sent in the forward, a
gradient in the backward.

A parameter read on several stages (an embedding tied to the head) lives on
each of them; each returns the part of its gradient its own nodes compute, and
the runtime adds the parts of the holders after the last micro-batch, in stage
order (program.notes[PIPELINE]["tied"]), as Megatron sums embedding gradients.

Refused: batch statistics (BatchNorm in training), which micro-batches cannot
reproduce, and any buffer the step updates, named by module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from shardfx.errors import ShardfxError
from shardfx.graphs import collectives, meta
from shardfx.graphs.cost_model import compute_seconds, hardware
from shardfx.graphs.program import PIPELINE, DistProgram
from shardfx.graphs.signature import BUFFER, BUFFER_UPDATE, GRAD, LOSS, PARAM
from shardfx.passes.manager import PassContext, PassResult

ORIGIN = "split_stages"
AXIS = "pp"
BATCH_STATS = {
    torch.ops.aten.native_batch_norm.default,
    torch.ops.aten._native_batch_norm_legit.default,
    torch.ops.aten._native_batch_norm_legit_functional.default,
    torch.ops.aten.cudnn_batch_norm.default,
}


@dataclass
class StagePlan:
    """Where the cuts are and what each stage holds (the same for every stage's copy)."""

    stages: int
    starts: list[str]  # the module that begins each stage ("" for stage 0: the model's input)
    seconds: list[float]  # the cost model's forward + backward seconds of each stage
    how: str  # "cost model" or "pp_split"
    stage_of: dict[str, int] = field(default_factory=dict)  # node name -> stage
    holders: dict[str, tuple[int, ...]] = field(default_factory=dict)  # param/buffer name -> stages
    blocks: list[str] = field(default_factory=list)  # the places a cut may go (block names)
    memory: list[int] = field(default_factory=list)  # estimated bytes each stage holds (MemoryLimit's model)


@dataclass(frozen=True)
class MemoryLimit:
    """What a stage may hold, and how its bytes are estimated: model state at `state_bytes` per
    parameter element (16: fp32 parameter, gradient and Adam's two moments; fewer under ZeRO),
    plus the activations one micro-batch keeps for its backward times the micro-batches the
    schedule keeps alive on that stage (1F1B: P - s; GPipe: M)."""

    limit: float | None  # bytes; None: no limit (the estimate is still reported)
    state_bytes: float
    alive_by_stage: tuple[int, ...] = ()  # micro-batches the schedule keeps alive on each stage

    def alive(self, stage: int, stages: int) -> int:
        return self.alive_by_stage[stage] if stage < len(self.alive_by_stage) else stages - stage


def split_stages(
    program: DistProgram,
    ctx: PassContext,
    *,
    stage: int,
    stages: int,
    split: tuple[str, ...] | None = None,
    holders: dict[str, list[int]] | None = None,
    memory: MemoryLimit | None = None,
    ranks: int | None = None,
) -> PassResult:
    """holders: the stages of each parameter, as the training step's split placed them: eval_step's
    forward-only program is cut to match (its capture has no module paths to cut at).
    memory: the most bytes a stage may hold; the cost model's cut respects it.
    ranks: the pp axis size when it is smaller than `stages` (interleaved: stage v runs on pp
    coordinate v % ranks, and a send's peer is the difference of coordinates)."""
    _refuse_batch_stats(program)
    if holders is not None:
        plan = plan_by_holders(program, stages, holders)
    else:
        plan = plan_stages(program, stages, split, ctx.config.hardware, memory)
    tied = _split_tied_gradients(program, plan)
    tags = _tags(program, plan)
    sends, recvs = _keep_stage(program, plan, stage, tied, ranks or stages, tags)
    program.notes[PIPELINE] = {
        "stage": stage,
        "stages": stages,
        "ranks": ranks or stages,
        "axis": AXIS,
        "starts": list(plan.starts),
        "seconds": list(plan.seconds),
        "how": plan.how,
        "tied": {name: list(h) for name, h in plan.holders.items() if len(h) > 1 and name in tied},
        "holders": {name: list(h) for name, h in plan.holders.items()},
        "memory": list(plan.memory),
    }
    program.recompile()
    return PassResult(
        program,
        {
            "stage": stage,
            "starts": plan.starts,
            "how": plan.how,
            "stage_seconds": [round(s, 6) for s in plan.seconds],
            "stage_bytes": list(plan.memory),
            "sends": sends,
            "recvs": recvs,
            "tied": sorted(tied),
        },
    )


# --- the plan -------------------------------------------------------------------------------


def block_of(path: str) -> str | None:
    """The block a module path lies in: the path up to its first numeric part (`model.layers.3`)."""
    parts = path.split(".") if path else []
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None


def plan_stages(
    program: DistProgram,
    stages: int,
    split: tuple[str, ...] | None,
    hw_name: str,
    memory: MemoryLimit | None = None,
) -> StagePlan:
    graph = program.graph
    forward = [n for n in graph.nodes if n.op == "call_function" and meta.phase(n) == meta.FORWARD]
    if not forward:
        raise ShardfxError("pipeline parallelism needs a forward to cut; the step has none")
    starts, blocks = _block_starts(forward)  # forward index -> block that begins there
    hw = hardware(hw_name, ranks=program.mesh.world_size)
    first_of_seq: dict[int, int] = {}
    for i, node in enumerate(forward):
        seq = node.meta.get("seq_nr")
        if seq is not None:
            first_of_seq.setdefault(seq, i)
    cost = [compute_seconds(n, hw) for n in forward]
    for node in graph.nodes:
        if node.op == "call_function" and meta.phase(node) != meta.FORWARD:
            i = first_of_seq.get(node.meta.get("seq_nr"))
            if i is not None:
                cost[i] += compute_seconds(node, hw)
    memory = memory or MemoryLimit(None, 16.0)
    state, kept = _bytes_by_node(program, forward, memory.state_bytes)
    if split is not None:
        cuts = _named_cuts(forward, split, blocks)
        how = "pp_split"
    else:
        if len(starts) < stages - 1:
            raise ShardfxError(
                f"pp_size={stages} needs {stages - 1} places to cut between blocks; the model has "
                f"{len(starts)} ({', '.join(blocks) or 'no module with an index in its path'}). "
                "Use a smaller pp_size, or name the modules that begin each stage in Config.pp_split"
            )
        cuts = _balanced_cuts(sorted(starts), cost, stages, state, kept, memory)
        how = "cost model"
    bounds = [0, *cuts, len(forward)]
    stage_of: dict[str, int] = {}
    for s in range(stages):
        for node in forward[bounds[s] : bounds[s + 1]]:
            stage_of[node.name] = s
    plan = StagePlan(
        stages,
        [""] + [starts.get(c) or str(meta.get(forward[c], meta.MODULE)) for c in cuts],
        [sum(cost[bounds[s] : bounds[s + 1]]) for s in range(stages)],
        how,
        stage_of,
        blocks=blocks,
        memory=[
            int(sum(state[bounds[s] : bounds[s + 1]]) + sum(kept[bounds[s] : bounds[s + 1]]) * memory.alive(s, stages))
            for s in range(stages)
        ],
    )
    _place_backward(program, plan, forward)
    _find_holders(program, plan)
    return plan


def plan_by_holders(program: DistProgram, stages: int, holders: dict[str, list[int]]) -> StagePlan:
    """Cut a forward-only program where the training step's stages begin: stage s at the first node
    that reads a parameter only stage s holds."""
    forward = [n for n in program.graph.nodes if n.op == "call_function"]
    only: dict[fx.Node, int] = {}
    for spec, node in zip(program.signature.inputs, program.placeholders()):
        if spec.role == PARAM and len(holders.get(spec.name, ())) == 1:
            only[node] = holders[spec.name][0]
    cuts: list[int] = []
    for s in range(1, stages):
        at = next((i for i, n in enumerate(forward) if any(only.get(a) == s for a in n.all_input_nodes)), None)
        if at is None or (cuts and at < cuts[-1]):
            raise ShardfxError(f"the forward-only program reads no parameter of stage {s} after stage {s - 1}'s")
        cuts.append(at)
    bounds = [0, *cuts, len(forward)]
    plan = StagePlan(stages, [""] + [str(meta.get(forward[c], meta.MODULE)) for c in cuts], [0.0] * stages, "holders")
    for s in range(stages):
        for node in forward[bounds[s] : bounds[s + 1]]:
            plan.stage_of[node.name] = s
    _find_holders(program, plan)
    for name, found in plan.holders.items():
        if name in holders and not set(found) <= set(holders[name]):
            raise ShardfxError(
                f"the forward-only program reads {name} on stages {list(found)}; the training step holds it on "
                f"{holders[name]}"
            )
        if name in holders:
            plan.holders[name] = tuple(holders[name])
    return plan


def _block_starts(forward: list[fx.Node]) -> tuple[dict[int, str], list[str]]:
    """{forward index where a block begins: block name} (not the first node), and every block in order."""
    starts: dict[int, str] = {}
    blocks: list[str] = []
    last: str | None = None
    for i, node in enumerate(forward):
        block = block_of(str(meta.get(node, meta.MODULE) or ""))
        if block is None or block == last:
            continue
        last = block
        if block not in blocks:
            blocks.append(block)
            if i > 0:
                starts[i] = block
    return starts, blocks


def _named_cuts(forward: list[fx.Node], split: tuple[str, ...], blocks: list[str]) -> list[int]:
    cuts: list[int] = []
    for name in split:
        at = next(
            (
                i
                for i, n in enumerate(forward)
                if (m := str(meta.get(n, meta.MODULE) or "")) == name or m.startswith(name + ".")
            ),
            None,
        )
        if at is None:
            raise ShardfxError(
                f"Config.pp_split names {name!r}, which no node of the forward comes from; "
                f"blocks a stage may begin at: {', '.join(blocks) or '(none found)'}"
            )
        if at == 0 or (cuts and at <= cuts[-1]):
            raise ShardfxError(
                f"Config.pp_split: {name!r} does not begin a stage after the previous one "
                f"({list(split)}); name modules in forward order, not the first"
            )
        cuts.append(at)
    return cuts


def _bytes_by_node(program: DistProgram, forward: list[fx.Node], per_param: float) -> tuple[list[float], list[float]]:
    """Per forward node: the model-state bytes of the parameters it reads first, and the bytes of
    the activations it makes that the backward keeps (one micro-batch)."""
    from shardfx.graphs.analysis import storage_owner, tensor_bytes

    index = {n: i for i, n in enumerate(forward)}
    state = [0.0] * len(forward)
    kept = [0.0] * len(forward)
    for spec, node in zip(program.signature.inputs, program.placeholders()):
        if spec.role == PARAM:
            users = [index[u] for u in node.users if u in index]
            if users:
                state[min(users)] += node.meta["val"].numel() * per_param
    owners = set()
    for node in forward:
        if any(u not in index and u.op != "output" for u in node.users):
            owners.add(storage_owner(node))
    for owner in owners:
        if owner in index:
            kept[index[owner]] += tensor_bytes(owner.meta.get("val"))
    return state, kept


def _balanced_cuts(
    candidates: list[int],
    cost: list[float],
    stages: int,
    state: list[float],
    kept: list[float],
    memory: MemoryLimit,
) -> list[int]:
    """stages-1 of the candidate cut indices that minimise the largest stage's cost, every stage
    within memory.limit (exact, by dynamic programming over the segments between candidates)."""
    edges = [0, *candidates, len(cost)]

    def prefix(values: list[float]) -> list[float]:
        out = [0.0]
        for v in values:
            out.append(out[-1] + v)
        return out

    seconds, state_sum, kept_sum = prefix(cost), prefix(state), prefix(kept)

    def between(p: list[float], a: int, b: int) -> float:  # segments a..b-1
        return p[edges[b]] - p[edges[a]]

    def stage_bytes(a: int, b: int, stage: int) -> float:
        return between(state_sum, a, b) + between(kept_sum, a, b) * memory.alive(stage, stages)

    def solve(objective: Any, limit: float | None) -> tuple[float, list[int]]:
        n = len(edges) - 1
        inf = float("inf")
        best = [[inf] * (n + 1) for _ in range(stages + 1)]
        how = [[0] * (n + 1) for _ in range(stages + 1)]
        best[0][0] = 0.0
        for k in range(1, stages + 1):
            for j in range(k, n + 1):
                for i in range(k - 1, j):
                    if limit is not None and stage_bytes(i, j, k - 1) > limit:
                        continue
                    value = max(best[k - 1][i], objective(i, j, k - 1))
                    if value < best[k][j]:
                        best[k][j], how[k][j] = value, i
        cuts: list[int] = []
        j = n
        if best[stages][n] < inf:
            for k in range(stages, 0, -1):
                j = how[k][j]
                if k > 1:
                    cuts.append(edges[j])
        return best[stages][n], sorted(cuts)

    value, cuts = solve(lambda a, b, k: between(seconds, a, b), memory.limit)
    if value == float("inf"):
        smallest, _ = solve(stage_bytes, None)
        raise ShardfxError(
            f"no cut into {stages} stages keeps every stage within Config.pp_stage_memory={memory.limit:.4g} bytes; "
            f"the smallest largest stage would hold {smallest:.4g} bytes (model state at {memory.state_bytes:g} "
            "bytes a parameter, activations of the micro-batches alive). Raise the limit, add stages, or recompute"
        )
    return cuts


def _place_backward(program: DistProgram, plan: StagePlan, forward: list[fx.Node]) -> None:
    stage_of = plan.stage_of
    by_seq: dict[int, int] = {}
    by_module: dict[str, int] = {}
    for node in forward:
        seq = node.meta.get("seq_nr")
        if seq is not None:
            by_seq.setdefault(seq, stage_of[node.name])
        by_module.setdefault(str(meta.get(node, meta.MODULE) or ""), stage_of[node.name])
    is_forward = {n.name for n in forward}
    for node in program.graph.nodes:
        if node.op != "call_function" or node.name in is_forward:
            continue
        inputs = [a for a in node.all_input_nodes if a.op != "placeholder"]
        lo = max((stage_of[a.name] for a in inputs if a.name in is_forward), default=0)
        grads = [stage_of[a.name] for a in inputs if a.name not in is_forward]
        hi = min(grads, default=plan.stages - 1)
        if lo > hi:
            raise ShardfxError(
                f"cannot place this backward node on a pipeline stage: it reads a forward value of stage {lo} "
                f"and a gradient of stage {hi}; cut elsewhere (Config.pp_split)",
                node,
            )
        hint = by_seq.get(node.meta.get("seq_nr"))
        if hint is None:
            hint = by_module.get(str(meta.get(node, meta.MODULE) or ""))
        if hint is None or (not grads and hint < lo):
            hint = hi if grads else lo
        stage_of[node.name] = min(max(hint, lo), hi)


def _find_holders(program: DistProgram, plan: StagePlan) -> None:
    outputs = program.outputs()
    for spec, node in zip(program.signature.inputs, program.placeholders()):
        if spec.role not in (PARAM, BUFFER):
            continue
        stages = {plan.stage_of[u.name] for u in node.users if u.op != "output"}
        if not stages:  # read by nothing: kept by the stage that returns its gradient, else the first
            grad = next(
                (o for s, o in zip(program.signature.outputs, outputs) if s.role == GRAD and s.target == spec.name),
                None,
            )
            stages = {plan.stage_of.get(grad.name, 0)} if isinstance(grad, fx.Node) else {0}
        plan.holders[spec.name] = tuple(sorted(stages))


# --- tied parameters --------------------------------------------------------------------------


def _split_tied_gradients(program: DistProgram, plan: StagePlan) -> dict[str, dict[int, fx.Node]]:
    """For each parameter held on several stages: {stage: the part of its gradient that stage computes}."""
    outputs = program.outputs()
    tied: dict[str, dict[int, fx.Node]] = {}
    for spec, grad in zip(program.signature.outputs, outputs):
        if spec.role != GRAD or len(plan.holders.get(spec.target, ())) < 2 or not isinstance(grad, fx.Node):
            continue
        leaves = _sum_leaves(grad, plan)
        parts: dict[int, fx.Node] = {}
        with program.graph.inserting_before(program.output_node()):
            for node in leaves:
                s = plan.stage_of[node.name]
                if s not in parts:
                    parts[s] = node
                    continue
                total = program.graph.call_function(torch.ops.aten.add.Tensor, (parts[s], node))
                total.meta.update({k: v for k, v in node.meta.items() if k != "seq_nr"})
                meta.copy_provenance(node, total, ORIGIN)
                plan.stage_of[total.name] = s
                parts[s] = total
        missing = [s for s in plan.holders[spec.target] if s not in parts]
        if missing:
            raise ShardfxError(
                f"parameter {spec.target} is read on stages {list(plan.holders[spec.target])} but stages "
                f"{missing} compute no part of its gradient",
                grad,
            )
        tied[spec.target] = parts
    # the whole sum is no value of any stage: each holder returns its part (the output points at one
    # of them until _keep_stage picks this stage's)
    for i, spec in enumerate(program.signature.outputs):
        if spec.role == GRAD and spec.target in tied:
            old = outputs[i]
            outputs[i] = next(iter(tied[spec.target].values()))
            program.set_outputs(outputs)
            _erase_unused_sums(program, old, set(tied[spec.target].values()))
    return tied


def _sum_leaves(node: fx.Node, plan: StagePlan) -> list[fx.Node]:
    """The terms of the gradient autograd summed (nested aten.add of backward values), in graph order;
    only sums whose terms lie on several stages are taken apart."""
    if _is_grad_sum(node) and len(_stages_below(node, plan)) > 1:
        return [leaf for a in node.args for leaf in _sum_leaves(a, plan)]
    return [node]


def _is_grad_sum(node: fx.Node) -> bool:
    return (
        node.op == "call_function"
        and node.target is torch.ops.aten.add.Tensor
        and len(node.args) == 2
        and not node.kwargs
        and all(isinstance(a, fx.Node) and a.op != "placeholder" for a in node.args)
        and meta.phase(node) != meta.FORWARD
    )


def _stages_below(node: fx.Node, plan: StagePlan) -> set[int]:
    """The stages of the terms under a nest of gradient sums."""
    seen: set[int] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if _is_grad_sum(n):
            stack.extend(n.args)
        else:
            seen.add(plan.stage_of[n.name])
    return seen


def _erase_unused_sums(program: DistProgram, node: fx.Node, keep: set[fx.Node]) -> None:
    """Erase a gradient sum nothing reads any more, and the sums under it that become unread."""
    stack = [node]
    while stack:
        n = stack.pop()
        if _is_grad_sum(n) and not n.users and n not in keep:
            args = list(n.args)
            program.graph.erase_node(n)
            stack.extend(args)


# --- keeping one stage ------------------------------------------------------------------------


def _tags(program: DistProgram, plan: StagePlan) -> dict[tuple[str, int], int]:
    """A tag for every (value, stage it goes to), numbered in graph order: the same on every
    stage's copy, so a send and its receive agree on it."""
    tags: dict[tuple[str, int], int] = {}
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        here = plan.stage_of[node.name]
        for t in sorted({plan.stage_of[u.name] for u in node.users if u.op == "call_function"} - {here}):
            tags[node.name, t] = len(tags)
    return tags


def _keep_stage(
    program: DistProgram,
    plan: StagePlan,
    stage: int,
    tied: dict[str, dict[int, fx.Node]],
    ranks: int,
    tags: dict[tuple[str, int], int],
) -> tuple[int, int]:
    graph = program.graph
    stage_of = plan.stage_of
    is_forward = {n.name for n in graph.nodes if n.op == "call_function" and meta.phase(n) == meta.FORWARD}
    mine = [n for n in graph.nodes if n.op == "call_function" and stage_of[n.name] == stage]
    mine_set = set(mine)
    sends = recvs = 0
    received: dict[fx.Node, fx.Node] = {}
    # receives, at the producer's place (so each pair of stages agrees on the order)
    for node in list(graph.nodes):
        if node.op != "call_function" or node in mine_set:
            continue
        readers = [u for u in node.users if u in mine_set]
        if not readers:
            continue
        val = _tensor_val(node)
        source = stage_of[node.name]
        with graph.inserting_after(node):
            recv = graph.call_function(
                collectives.RECV,
                (list(val.shape), val.dtype, val.device, AXIS, source % ranks - stage % ranks, tags[node.name, stage]),
            )
        _p2p_meta(node, recv, node.name)
        recv.meta[meta.PHASE] = meta.FORWARD if node.name in is_forward and source < stage else meta.BACKWARD
        recv.meta["val"] = val
        if meta.PLACEMENT in node.meta:
            recv.meta[meta.PLACEMENT] = dict(node.meta[meta.PLACEMENT])
        for user in readers:
            user.replace_input_with(node, recv)
        received[node] = recv
        recvs += 1
    # sends, right after the producer, one per reading stage
    for node in mine:
        targets = sorted({stage_of[u.name] for u in node.users if u.op == "call_function" and u not in mine_set})
        targets = [t for t in targets if t != stage]
        if not targets:
            continue
        _tensor_val(node)
        at = node
        for t in targets:
            with graph.inserting_after(at):
                send = graph.call_function(
                    collectives.SEND, (node, AXIS, t % ranks - stage % ranks, tags[node.name, t])
                )
            _p2p_meta(node, send, node.name)
            send.meta["val"] = None
            at = send
            sends += 1
    # the outputs this stage returns
    outputs = program.outputs()
    kept_out, kept_specs = [], []
    for spec, value in zip(program.signature.outputs, outputs):
        if spec.role == BUFFER_UPDATE:
            raise ShardfxError(
                f"buffer {spec.target} is updated by the step; pipeline stages run micro-batches one after "
                "another and cannot update it as one batch would (pipeline parallelism supports no buffer updates)"
            )
        if spec.role == GRAD and spec.target in tied:
            part = tied[spec.target].get(stage)
            if part is not None:
                kept_out.append(part)
                kept_specs.append(spec)
            continue
        if spec.role == GRAD and stage not in plan.holders.get(spec.target, ()):
            continue
        if not isinstance(value, fx.Node):  # a constant output (None gradient): the holder returns it
            if spec.role != GRAD or stage in plan.holders.get(spec.target, ()):
                kept_out.append(value)
                kept_specs.append(spec)
            continue
        owner = stage_of.get(value.name)
        if owner == stage:
            kept_out.append(value)
            kept_specs.append(spec)
        elif spec.role == GRAD:
            raise ShardfxError(
                f"the gradient of {spec.target} (held on stages {list(plan.holders[spec.target])}) is computed "
                f"on stage {owner}",
                value,
            )
        elif spec.role != LOSS:
            raise ShardfxError(f"output {spec.role} {spec.target} is computed on stage {owner}", value)
    program.set_outputs(kept_out)
    program.signature.outputs = kept_specs
    # drop the other stages' nodes, then the parameters and buffers this stage does not hold
    keep = mine_set | set(received.values())
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and node not in keep and node.target is not collectives.SEND:
            if node.users:
                raise ShardfxError(f"stage {stage} still reads a node of stage {stage_of.get(node.name)}", node)
            graph.erase_node(node)
    specs, placeholders = [], program.placeholders()
    for spec, node in zip(list(program.signature.inputs), placeholders):
        held = spec.role not in (PARAM, BUFFER) or stage in plan.holders.get(spec.name, ())
        if held:
            specs.append(spec)
            continue
        if node.users:
            raise ShardfxError(f"stage {stage} reads {spec.name}, which it does not hold", node)
        graph.erase_node(node)
    program.signature.inputs = specs
    for node in graph.nodes:
        if node.op == "call_function":
            node.meta[meta.STAGE] = stage
    return sends, recvs


def _tensor_val(node: fx.Node) -> torch.Tensor:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise ShardfxError(
            f"a value that crosses a pipeline cut must be a tensor; this node makes {type(val).__name__} "
            "(cut elsewhere: Config.pp_split)",
            node,
        )
    return val


def _p2p_meta(src: fx.Node, node: fx.Node, tag: str) -> None:
    meta.copy_provenance(src, node, ORIGIN)
    node.meta[meta.ROLE] = meta.P2P
    node.meta[meta.TARGET] = tag


def _refuse_batch_stats(program: DistProgram) -> None:
    for node in program.graph.nodes:
        synced = meta.get(node, meta.ORIGIN) == "sync_batch_norm"  # global statistics over dp, still per batch
        if node.op == "call_function" and (synced or (node.target in BATCH_STATS and _training(node))):
            where = meta.get(node, meta.MODULE) or "the model"
            raise ShardfxError(
                f"{where} takes statistics over the batch (BatchNorm in training); the pipeline runs the batch "
                "as micro-batches, which would each get their own statistics and so not match one device. "
                "Use pp_size=1, a norm that does not mix samples (LayerNorm, GroupNorm), or put the module in eval mode",
                node,
            )


def _training(node: fx.Node) -> Any:
    training = node.args[5] if len(node.args) > 5 else node.kwargs.get("training", True)
    return training is True or node.target is torch.ops.aten.cudnn_batch_norm.default
