"""The program as data for the viewers: one record per node, and the self-contained HTML page.

`node_records(program)` describes every node (kind, phase, module, dtype,
shape, placement, origin, source line, inputs); the HTML page
(viz_template.html: inline CSS and JS, no network) and the SVG (viz.py) are
drawn from these records.

Kinds: "collective" (any shardfx.* op), "recompute" (meta RECOMPUTE),
"fused" (meta FUSION), "input", "output" and "compute" for the rest.
Parameter inputs are grouped under the module that owns them.
"""

from __future__ import annotations

import html
import json
from importlib import resources
from typing import Any

import torch
import torch.fx as fx

from shardfx.errors import node_source
from shardfx.graphs import meta
from shardfx.graphs.format import format_node, format_value, op_name
from shardfx.graphs.signature import PARAM
from shardfx.tools.stages import Stage

KINDS = ("compute", "collective", "recompute", "fused", "input", "output")
PHASES = {meta.FORWARD: "fwd", meta.BACKWARD: "bwd", meta.OPTIMIZER: "opt"}


def node_kind(node: fx.Node) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "shardfx":
        return "collective"
    if node.meta.get(meta.RECOMPUTE):
        return "recompute"
    if node.meta.get(meta.FUSION):
        return "fused"
    return "compute"


def node_records(stage: Stage) -> list[dict[str, Any]]:
    program = stage.program
    nodes = list(program.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    owner = {  # parameter placeholder -> the module that owns the parameter
        node: spec.name.rpartition(".")[0]
        for spec, node in zip(program.signature.inputs, program.placeholders())
        if spec.role == PARAM
    }
    records = []
    for i, n in enumerate(nodes):
        val = n.meta.get("val")
        placement = n.meta.get(meta.PLACEMENT) or {}
        record = {
            "i": i,
            "n": n.name,
            "op": "input" if n.op == "placeholder" else "output" if n.op == "output" else op_name(n.target),
            "k": node_kind(n),
            "ph": PHASES.get(n.meta.get(meta.PHASE, ""), ""),
            "m": owner.get(n, n.meta.get(meta.MODULE) or ""),
            "dt": format_value(val).partition("[")[0] if isinstance(val, torch.Tensor) else "",
            "sh": list(val.shape) if isinstance(val, torch.Tensor) else format_value(val),
            "pl": " ".join(f"{axis}:{p}" for axis, p in placement.items()),
            "o": n.meta.get(meta.ORIGIN, ""),
            "src": node_source(n),
            "a": [index[a] for a in n.all_input_nodes],
            "t": format_node(n),
        }
        if meta.ROLE in n.meta:
            record["role"] = f"{n.meta[meta.ROLE]} {n.meta.get(meta.TARGET, '')}".strip()
        records.append(record)
    return records


def stage_data(stage: Stage) -> dict[str, Any]:
    return {"name": stage.name, "index": stage.index, "stats": stage.stats(), "nodes": node_records(stage)}


def render_html(
    title: str,
    stages: list[Stage],
    trace: dict[str, Any] | None = None,
    measured_trace: dict[str, Any] | None = None,
) -> str:
    """One self-contained page; two stages open side by side. `trace`: {file, step_ms, hardware} of a
    simulated-step trace written beside it; `measured_trace`: {file, step, step_ms, simulated_step_ms,
    hardware} of a measured one (`shardfx train --trace`). The header links to each (`file` relative to
    the page)."""
    data: dict[str, Any] = {"title": title, "stages": [stage_data(s) for s in stages]}
    if trace is not None:
        data["trace"] = trace
    if measured_trace is not None:
        data["measured_trace"] = measured_trace
    # JSON inside <script>: '</' must not close the element early.
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    template = resources.files("shardfx.tools").joinpath("viz_template.html").read_text()
    return template.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)
