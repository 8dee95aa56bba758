"""DistProgram: the per-rank graph plus everything needed to run it.

The same program runs on every rank (SPMD). It holds the graph, its typed
signature, the device mesh, the ShardSpec of every sharded parameter, and the
FakeTensorMode the graph's `val`s live in (passes use it to give new nodes a
`val`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch.fx.graph_module import _copy_attr

from shardfx.graphs.placement import ShardSpec
from shardfx.graphs.signature import Signature


@dataclass(frozen=True)
class Mesh:
    """Named mesh axes and their sizes, outermost first (e.g. {"dp": 2, "tp": 2})."""

    axes: tuple[tuple[str, int], ...]

    @classmethod
    def of(cls, **sizes: int) -> Mesh:
        return cls(tuple(sizes.items()))

    def size(self, axis: str) -> int:
        for name, n in self.axes:
            if name == axis:
                return n
        raise KeyError(f"mesh has no axis {axis!r}; axes: {self.names}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.axes)

    @property
    def world_size(self) -> int:
        total = 1
        for _, n in self.axes:
            total *= n
        return total

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's index along each axis (row-major: the last axis varies fastest)."""
        out: dict[str, int] = {}
        for name, n in reversed(self.axes):
            out[name] = rank % n
            rank //= n
        return dict(reversed(list(out.items())))

    def group(self, rank: int, axis: str) -> list[int]:
        """The global ranks that share every coordinate with `rank` except `axis`."""
        mine = self.coords(rank)
        return [r for r in range(self.world_size) if all(v == mine[a] for a, v in self.coords(r).items() if a != axis)]

    def peer(self, rank: int, axis: str, offset: int) -> int | None:
        """The global rank `offset` steps from `rank` along `axis` (None: off the end of the axis)."""
        group = self.group(rank, axis)
        index = group.index(rank) + offset
        return group[index] if 0 <= index < len(group) else None

    def __str__(self) -> str:
        return " x ".join(f"{name}={n}" for name, n in self.axes)


# Keys of DistProgram.notes: what a pass decided that a later pass or a tool reads.
FUSION_REGIONS = "fusion"  # fuse: region id -> {"rows", "cols", "phase"}
TRITON_REGIONS = "triton_regions"  # lower_to_triton: one kernels.report.RegionReport per generated kernel
# split_stages: {"stage", "stages", "ranks" (pp axis size), "axis", "starts", "seconds", "memory", "how",
# "tied": {param: [holder stages]}, "holders": {param or buffer: [stages]}}
PIPELINE = "pipeline"
PHASES = "phases"  # the compile driver: the program split into its forward and backward (graphs/phases.py)
PLAN = "plan"  # the planner (Config(plan="auto")): the plan this program was chosen by (Plan.as_dict)


@dataclass(frozen=True)
class Schedule:
    """Which program runs when: the data the compile driver hands the engine.

    `micro_batches[i]` names the program (a key of the compiled programs: "step", or
    "first" / "middle" / "last" under accumulation) that runs micro-batch i of an
    optimizer step. `whole_step` names the programs whose gradients, and the gradient
    norm they return, cover the whole optimizer step (the reduced sum of every
    micro-batch); the others' gradients are kept by each rank's state until then.
    """

    micro_batches: tuple[str, ...]
    whole_step: frozenset[str] = frozenset()

    @property
    def grad_accum_steps(self) -> int:
        return len(self.micro_batches)

    def program_for(self, micro_batch: int) -> str:
        return self.micro_batches[micro_batch % len(self.micro_batches)]


@dataclass
class DistProgram:
    gm: fx.GraphModule
    signature: Signature
    mesh: Mesh
    fake_mode: Any
    shard_specs: dict[str, ShardSpec] = field(default_factory=dict)  # ZeRO, on the "dp" axis
    tp_specs: dict[str, ShardSpec] = field(default_factory=dict)  # tensor parallel, applied first
    notes: dict[str, Any] = field(default_factory=dict)  # what passes decided, for tools

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder"]

    def placeholders_of(self, role: str) -> list[fx.Node]:
        """The placeholders whose signature role is `role` (e.g. GRAD_ACC: the gradient accumulators)."""
        return [n for spec, n in zip(self.signature.inputs, self.placeholders()) if spec.role == role]

    def output_node(self) -> fx.Node:
        return next(n for n in reversed(self.graph.nodes) if n.op == "output")

    def outputs(self) -> list[fx.Node]:
        return list(self.output_node().args[0])

    def set_outputs(self, values: list[fx.Node]) -> None:
        self.output_node().args = (tuple(values),)

    def specs(self, name: str) -> list[ShardSpec]:
        """The shard specs of a parameter, in the order they apply to the full tensor."""
        return [s for s in (self.tp_specs.get(name), self.shard_specs.get(name)) if s is not None]

    def first_holder(self, name: str, rank: int) -> bool:
        """Whether `rank` is the first of the ranks holding the same piece of parameter `name`:
        its coordinate is 0 on every mesh axis that does not split the parameter. Pipeline stages
        hold different parameters; one held on several (tied) counts on the first of them."""
        axes = {spec.axis for spec in self.specs(name)}
        coords = self.mesh.coords(rank)
        pipeline = self.notes.get(PIPELINE, {})
        tied = pipeline.get("tied", {})
        if name in tied and coords.get("pp") != tied[name][0] % pipeline.get("ranks", self.mesh.size("pp")):
            return False
        return all(c == 0 for axis, c in coords.items() if axis not in axes and axis != "pp")

    def note(self, key: str, provider: str) -> Any:
        """A note an earlier pass left (FUSION_REGIONS, TRITON_REGIONS); a clear error if it has not run."""
        if key not in self.notes:
            from shardfx.errors import ShardfxError

            raise ShardfxError(f"the program has no {key!r} note; it is provided by {provider}, which has not run")
        return self.notes[key]

    def recompile(self) -> None:
        self.graph.lint()
        self.gm.recompile()


def clone_program(program: DistProgram, *, lazy: bool = False) -> DistProgram:
    """An independent copy to rewrite or keep: new nodes and meta (vals are shared: passes replace them, never mutate).

    lazy: do not generate the copy's Python code (a third of the cost): for a copy that is only
    analysed (simulated, compared), or rewritten and then recompiled, as run_passes does."""
    import copy

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in program.graph.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
        # nested dicts (placements) are per copy: passes update them in place
        env[node].meta = {k: dict(v) if isinstance(v, dict) else v for k, v in node.meta.items()}
    graph._codegen = program.graph._codegen
    if lazy:
        gm = fx.GraphModule(program.gm, fx.Graph())
        for node in graph.nodes:
            if node.op == "get_attr":
                _copy_attr(program.gm, gm, node.target)
        gm._graph = graph  # what the graph setter does, less the code generation
        graph.owning_module = gm
    else:
        gm = fx.GraphModule(program.gm, graph)
    return DistProgram(
        gm,
        copy.deepcopy(program.signature),
        program.mesh,
        program.fake_mode,
        dict(program.shard_specs),
        dict(program.tp_specs),
        dict(program.notes),
    )
