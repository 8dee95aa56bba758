"""Invariants every program keeps after every pass (the pass manager calls `verify`)."""

from __future__ import annotations

import torch.fx as fx

from shardfx.errors import VerificationError
from shardfx.graphs import collectives, meta
from shardfx.graphs.program import DistProgram
from shardfx.graphs.signature import INPUT_ROLES, OUTPUT_ROLES


def verify(program: DistProgram) -> None:
    graph = program.graph
    try:
        graph.lint()
    except Exception as exc:  # noqa: BLE001 - re-raised as a VerificationError
        raise VerificationError(f"graph does not lint: {exc}") from exc
    placeholders = program.placeholders()
    if len(placeholders) != len(program.signature.inputs):
        raise VerificationError(
            f"{len(placeholders)} placeholders but the signature lists {len(program.signature.inputs)} inputs"
        )
    outputs = program.outputs()
    if len(outputs) != len(program.signature.outputs):
        raise VerificationError(
            f"the graph returns {len(outputs)} values but the signature lists {len(program.signature.outputs)}"
        )
    for spec in program.signature.inputs:
        if spec.role not in INPUT_ROLES:
            raise VerificationError(f"input {spec.name} has unknown role {spec.role!r}")
    for spec in program.signature.outputs:
        if spec.role not in OUTPUT_ROLES:
            raise VerificationError(f"output {spec.target} has unknown role {spec.role!r}")
    axes = set(program.mesh.names)
    for node in graph.nodes:
        if node.op == "output":
            continue
        if "val" not in node.meta:
            raise VerificationError("node has no 'val' (its shape and dtype are unknown)", node)
        if meta.PHASE not in node.meta:
            raise VerificationError("node has no phase", node)
        if collectives.is_collective(node) and collectives.axis_of(node) not in axes:
            raise VerificationError(
                f"collective names axis {collectives.axis_of(node)!r}; the mesh has {sorted(axes)}", node
            )
        if collectives.is_collective(node) and not node.users:
            raise VerificationError("collective whose result nothing reads (a dead transfer)", node)
        if collectives.is_start(node) and any(not collectives.is_wait(u) for u in node.users):
            raise VerificationError("an async collective's buffer is read before its wait", node)
        if collectives.is_wait(node) and not collectives.is_start(node.args[0]):
            raise VerificationError("wait on something that is not an async collective", node)
        if node.op == "get_attr":
            sub = getattr(program.gm, str(node.target), None)
            if isinstance(sub, fx.GraphModule) and any(collectives.is_collective(n) for n in sub.graph.nodes):
                raise VerificationError(
                    "a collective sits inside a subgraph (a branch or loop some rank may skip)", node
                )
