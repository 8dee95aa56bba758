"""One readable Triton kernel per region.

The kernel loads every input once (converting bf16/fp16 to fp32), computes
each member node as one line in fp32 (the line names the node it came from),
and stores each value that is read outside the region once, converted to its
dtype. A comment at the top states the kernel's memory traffic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from shardfx.graphs.format import format_value, op_name
from shardfx.kernels import rules
from shardfx.kernels.classify import classify
from shardfx.kernels.layout import COL, FULL, ROW, SCALAR, Domain, elements

_TL = {
    torch.float32: "tl.float32",
    torch.bfloat16: "tl.bfloat16",
    torch.float16: "tl.float16",
    torch.int64: "tl.int64",
    torch.int32: "tl.int32",
    torch.bool: "tl.int1",
}


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str

    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class KernelSpec:
    """Everything needed to launch a region's kernel, and to say what it moves."""

    name: str
    source: str
    domain: Domain
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    block_r: int
    block_c: int

    @property
    def grid(self) -> tuple[int, int]:
        return (-(-self.domain.rows // self.block_r), -(-self.domain.cols // self.block_c))

    def shapes_key(self) -> str:
        parts = [f"{s.kind}:{list(s.shape)}:{s.dtype}" for s in self.inputs + self.outputs]
        return f"{self.domain}|{self.block_r}x{self.block_c}|" + ",".join(parts)


class Var(str):
    """The name of a value in the kernel (as opposed to a Python literal argument)."""


class Emitter:
    """What rules use to write code: casts to fp32, temporaries, literals."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.cls: dict[str, str] = {}  # var -> "f" (fp32), "i" (integer), "b" (bool)
        self.items: dict[fx.Node, tuple[Var, ...]] = {}
        self._n = 0

    def new(self, expr: str, cls: str, comment: str = "", prefix: str = "t") -> Var:
        name = Var(f"{prefix}{self._n}")
        self._n += 1
        self.lines.append(f"{name} = {expr}" + (f"  # {comment}" if comment else ""))
        self.cls[name] = cls
        return name

    def tmp(self, expr: str) -> Var:
        return self.new(expr, "f")

    def val(self, a: Any) -> str:
        return a if isinstance(a, Var) else self.literal(a)

    def f(self, a: Any) -> str:
        if isinstance(a, Var):
            return a if self.cls[a] == "f" else f"{a}.to(tl.float32)"
        return self.literal(float(a) if isinstance(a, (bool, int)) else a)

    def cast(self, node: fx.Node, a: Any) -> str:
        return self.f(a) if node.meta["val"].dtype.is_floating_point else self.val(a)

    def common(self, a: Any, b: Any) -> tuple[str, str]:
        def is_float(x: Any) -> bool:
            return (isinstance(x, Var) and self.cls[x] == "f") or (not isinstance(x, Var) and isinstance(x, float))

        if is_float(a) or is_float(b):
            return self.f(a), self.f(b)
        return self.val(a), self.val(b)

    def full(self, x: str) -> str:
        return f"tl.broadcast_to({x}, [BLOCK_R, BLOCK_C])"

    def convert(self, a: Any, dtype: torch.dtype) -> str:
        if dtype in (torch.bfloat16, torch.float16):
            return f"{self.f(a)}.to({_TL[dtype]}).to(tl.float32)"  # round where eager rounds
        if dtype.is_floating_point:
            return self.f(a)
        if dtype == torch.bool:
            return f"{self.val(a)} != 0"
        return f"{self.val(a)}.to({_TL[dtype]})"

    def literal(self, value: Any, dtype: torch.dtype | None = None) -> str:
        if dtype is not None and dtype.is_floating_point:
            value = float(value)
        if isinstance(value, float):
            return f"float('{value}')" if math.isinf(value) or math.isnan(value) else repr(value)
        if isinstance(value, (bool, int)):
            return repr(value)
        raise TypeError(f"no Triton literal for {value!r}")

    def item(self, parent: fx.Node, index: int) -> str:
        return self.items[parent][index]


def _cls(dtype: torch.dtype) -> str:
    return "f" if dtype.is_floating_point else "b" if dtype == torch.bool else "i"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def generate(name: str, members: list[fx.Node], domain: Domain, title: str = "") -> tuple[KernelSpec, list, list]:
    """Triton source for the region `members` (in graph order).

    Returns (spec, input nodes, output nodes): the kernel's i-th input is the
    i-th input node as spec.inputs[i].kind reads it; its j-th output replaces
    the j-th output node.
    """
    in_region = set(members)
    e = Emitter()
    loads: dict[tuple[fx.Node, str], Var] = {}
    in_nodes: list[fx.Node] = []
    in_specs: list[TensorSpec] = []
    body: list[str] = []
    names: dict[fx.Node, Var] = {}
    whole_row = False
    for node in members:
        fit = classify(node, domain, in_region)
        assert fit is not None, f"{node.format_node()} does not fit region {name} ({domain})"
        r = rules.RULES[node.target]
        whole_row |= r.kind in (rules.REDUCTION, rules.GATHER)
        args: list[Any] = list(node.args)
        for i, a in enumerate(node.args):
            if not isinstance(a, fx.Node):
                continue
            if a in in_region:
                args[i] = names.get(a)
                continue
            if i not in fit.operands:
                continue  # a shape-only argument (zeros_like)
            if _is_scalar_constant(a):  # a 0-d constant made by an eager op: a literal here
                args[i] = a.args[0]
                continue
            key = (a, fit.operands[i])
            if key not in loads:
                val = a.meta["val"]
                loads[key] = _load(e, len(in_nodes), val.dtype, fit.operands[i], a)
                in_nodes.append(a)
                in_specs.append(TensorSpec(tuple(val.shape), val.dtype, fit.operands[i]))
            args[i] = loads[key]
        result = r.emit(e, node, args)
        comment = f"{node.name} = {op_name(node.target)}  {format_value(node.meta['val'])}"
        if isinstance(result, tuple):
            e.items[node] = tuple(Var(x) for x in result)
            e.lines.append(f"# {comment}: ({', '.join(result)})")
        else:
            names[node] = e.new(result, _cls(node.meta["val"].dtype), comment, prefix="v")
    outputs = [n for n in members if n in names and any(u not in in_region for u in n.users)]
    out_specs = [TensorSpec(tuple(n.meta["val"].shape), n.meta["val"].dtype, fit_kind(n, domain)) for n in outputs]
    block_c = _next_pow2(domain.cols) if whole_row else min(_next_pow2(domain.cols), 1024)
    block_r = max(1, min(_next_pow2(domain.rows), 4096 // block_c))
    load_lines = [ln for ln in e.lines if ln.startswith("x")]
    body = [ln for ln in e.lines if not ln.startswith("x")]
    spec = KernelSpec(name, "", domain, tuple(in_specs), tuple(out_specs), block_r, block_c)
    stores = [_store(j, names[n], s, spec.grid[1]) for j, (n, s) in enumerate(zip(outputs, out_specs))]
    source = _source(spec, title, members, load_lines, body, stores)
    return KernelSpec(name, source, domain, tuple(in_specs), tuple(out_specs), block_r, block_c), in_nodes, outputs


def _is_scalar_constant(node: fx.Node) -> bool:
    return node.target is torch.ops.aten.scalar_tensor.default and isinstance(node.args[0], (int, float, bool))


def fit_kind(node: fx.Node, domain: Domain) -> str:
    from shardfx.kernels.layout import value_kind

    kind = value_kind(node.meta["val"].shape, domain)
    assert kind in (FULL, ROW), node.format_node()
    return kind


def _load(e: Emitter, i: int, dtype: torch.dtype, kind: str, node: fx.Node) -> Var:
    where = {
        FULL: f"tl.load(in{i} + offs, mask=mask, other=0)",
        ROW: f"tl.load(in{i} + rows, mask=row_mask, other=0)",
        COL: f"tl.load(in{i} + cols, mask=col_mask, other=0)",
        SCALAR: f"tl.load(in{i})",
    }[kind]
    if dtype.is_floating_point:
        where += ".to(tl.float32)"
    elif dtype == torch.bool:
        where += " != 0"
    return e.new(where, _cls(dtype), f"%{node.name} {format_value(node.meta['val'])} {kind}", prefix="x")


def _store(j: int, var: str, spec: TensorSpec, col_blocks: int) -> str:
    dtype = _TL[spec.dtype]
    if spec.kind == FULL:
        return f"tl.store(out{j} + offs, tl.broadcast_to({var}, [BLOCK_R, BLOCK_C]).to({dtype}), mask=mask)"
    # with several column blocks each computes the same row value; the first one writes it
    mask = "row_mask" if col_blocks == 1 else "row_mask & (tl.zeros([BLOCK_R, 1], tl.int32) + tl.program_id(1) == 0)"
    return f"tl.store(out{j} + rows, tl.broadcast_to({var}, [BLOCK_R, 1]).to({dtype}), mask={mask})"


def traffic(spec: KernelSpec) -> tuple[int, int]:
    """(bytes read, bytes written) by the kernel: each input once per tile that needs it."""
    rows_blocks, col_blocks = spec.grid
    read = 0
    for s in spec.inputs:
        n = elements(s.kind, spec.domain)
        repeat = {FULL: 1, ROW: col_blocks, COL: rows_blocks, SCALAR: rows_blocks * col_blocks}[s.kind]
        read += n * repeat * s.dtype.itemsize
    written = sum(elements(s.kind, spec.domain) * s.dtype.itemsize for s in spec.outputs)
    return read, written


def _source(spec: KernelSpec, title: str, members: list[fx.Node], loads, body, stores) -> str:  # type: ignore[no-untyped-def]
    read, written = traffic(spec)
    ins = " + ".join(f"{s.kind} {_dt(s)}{list(s.shape)}" for s in spec.inputs) or "nothing"
    outs = " + ".join(f"{s.kind} {_dt(s)}{list(s.shape)}" for s in spec.outputs) or "nothing"
    ops = ", ".join(op_name(n.target).removeprefix("aten.") for n in members)
    lines = [
        f"# {title}",
        f"# domain {spec.domain.rows} rows x {spec.domain.cols} cols; tile {spec.block_r} x {spec.block_c}",
        f"# ops: {ops}",
        f"# reads {read} bytes ({ins})",
        f"# writes {written} bytes ({outs})",
    ]
    params = [f"in{i}" for i in range(len(spec.inputs))] + [f"out{j}" for j in range(len(spec.outputs))]
    src = [
        "import triton",
        "import triton.language as tl",
        "",
        "",
        "@triton.jit",
        f"def {spec.name}({', '.join(params + ['R', 'C', 'BLOCK_R: tl.constexpr', 'BLOCK_C: tl.constexpr'])}):",
        *(f"    {ln}" for ln in lines),
        "    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]  # (BLOCK_R, 1)",
        "    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]  # (1, BLOCK_C)",
        "    row_mask = rows < R",
        "    col_mask = cols < C",
        "    mask = row_mask & col_mask",
        "    offs = rows.to(tl.int64) * C + cols",
        *(f"    {ln}" for ln in loads),
        *(f"    {ln}" for ln in body),
        *(f"    {ln}" for ln in stores),
    ]
    return "\n".join(src) + "\n"


def _dt(s: TensorSpec) -> str:
    return format_value(torch.empty(0, dtype=s.dtype)).split("[")[0]
