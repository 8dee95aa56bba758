"""A stable text form of a program: one node per line, diffable between passes and runs.

%addmm = aten.addmm(%p_fc_bias, %batch_0, %t)  f32[4, 8]  fwd  fc  capture
%all_reduce = shardfx.all_reduce(%t_4, 'dp', 'avg')  f32[8, 16]  bwd  fc  data_parallel  dp:R
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from shardfx.graphs import meta
from shardfx.graphs.program import DistProgram

_DTYPES = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float64: "f64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.bool: "b8",
    torch.uint8: "u8",
}
_PHASES = {meta.FORWARD: "fwd", meta.BACKWARD: "bwd", meta.OPTIMIZER: "opt"}


def format_value(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        return f"{_DTYPES.get(val.dtype, str(val.dtype))}{list(val.shape)}"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(format_value(v) for v in val) + ")"
    if val is None:
        return "None"
    return type(val).__name__


def op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        ns, name = target.namespace, target._schema.name.split("::")[-1]
        overload = target._overloadname
        return f"{ns}.{name}" + ("" if overload == "default" else f".{overload}")
    return getattr(target, "__name__", str(target))


def _arg(a: Any) -> str:
    if isinstance(a, fx.Node):
        return f"%{a.name}"
    if isinstance(a, (tuple, list)):
        inner = ", ".join(_arg(x) for x in a)
        return f"[{inner}]"
    if isinstance(a, torch.dtype):
        return _DTYPES.get(a, str(a))
    if isinstance(a, float):
        return repr(a)
    return repr(a)


def format_node(node: fx.Node) -> str:
    if node.op == "placeholder":
        head = f"%{node.name} = input"
    elif node.op == "output":
        return "return (" + ", ".join(_arg(a) for a in node.args[0]) + ")"
    elif node.target is operator.getitem:
        head = f"%{node.name} = %{node.args[0].name}[{node.args[1]}]"
    else:
        args = [_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()]
        head = f"%{node.name} = {op_name(node.target)}({', '.join(args)})"
    cols = [head, format_value(node.meta.get("val"))]
    cols.append(_PHASES.get(node.meta.get(meta.PHASE, ""), "?"))
    cols.append(node.meta.get(meta.MODULE) or "-")
    cols.append(node.meta.get(meta.ORIGIN, "?"))
    placement = node.meta.get(meta.PLACEMENT)
    if placement:
        cols.append(" ".join(f"{axis}:{p}" for axis, p in placement.items()))
    return "  ".join(cols)


def format_program(program: DistProgram, title: str = "") -> str:
    lines = []
    if title:
        lines.append(f"# {title}")
    lines.append(f"# mesh: {program.mesh}")
    for name, spec in program.shard_specs.items():
        lines.append(
            f"# shard {name}: {spec.axis} dim {spec.dim} full {list(spec.full_shape)} "
            f"shard {list(spec.shard_shape)} padding {spec.padding}"
        )
    for line in program.signature.describe().splitlines():
        lines.append(f"# {line}")
    lines.extend(format_node(n) for n in program.graph.nodes)
    return "\n".join(lines) + "\n"
