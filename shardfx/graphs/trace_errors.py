"""Trace errors a person can act on: the module, the op and the user's source line, not torch's stack.

Used by both traces (capture.py, capture_forward.py). torch's own log output of a
failed export (the half-traced graph) is held back (quiet_torch_logs).
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import traceback
from typing import Any

import torch.fx as fx

from shardfx.errors import TraceError, node_source

ROOT = "model"  # attribute of the step wrapper that holds the user's model (module paths start with it)


@contextlib.contextmanager
def quiet_torch_logs() -> Any:
    """torch prints the half-traced graph on a failed export; our TraceError says what matters.

    What torch writes to stderr is held back, and passed on only if the export succeeds.
    """
    names = ("torch", "torch.fx.experimental.symbolic_shapes")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    held = io.StringIO()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(held):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    sys.stderr.write(held.getvalue())


def trace_error(
    exc: BaseException, what: str, module: tuple[str, str] | None, graph: fx.Graph | None = None
) -> TraceError:
    """A short error naming the module, the op and the user's source line instead of a torch stack."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "/torch/" not in f.filename and "/shardfx/" not in f.filename]
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    lines = [f"{what}: {type(exc).__name__}: {first}"]
    op = _op_name(str(exc))
    node = _node_of_op(graph, op) if graph is not None and op else None
    if node is not None:  # the failure is in a later stage: the exported graph knows where the op came from
        stack = node.meta.get("nn_module_stack") or {}
        path, cls = list(stack.values())[-1] if stack else ("", "")
        path = path[len(ROOT) + 1 :] if path.startswith(ROOT + ".") else ("" if path == ROOT else path)
        module = (path, str(getattr(cls, "__name__", cls)).split(".")[-1])
    if module is not None:
        lines.append(f"  module: {module[0] or '(root)'} ({module[1]})")
    if node is not None:
        source = node_source(node)
        if source:
            lines.append(f"  source: {source}")
    elif user:
        f = user[-1]
        lines.append(f'  source: File "{f.filename}", line {f.lineno}, in {f.name}: {f.line}')
    if op:
        lines.append(f"  op: {op}")
    hint = _hint(str(exc))
    if hint:
        lines.append(f"  hint: {hint}")
    return TraceError("\n".join(lines))


def _node_of_op(graph: fx.Graph, op: str) -> fx.Node | None:
    for node in graph.nodes:
        if node.op == "call_function" and str(node.target).replace("::", ".").startswith(op.replace("::", ".")):
            return node
    return None


def _op_name(text: str) -> str:
    for token in text.replace("(", " ").replace(",", " ").split():
        if token.startswith(("aten.", "aten::", "torch.ops.")):
            return token.rstrip(".:'\"")
    return ""


def _hint(text: str) -> str:
    if "data-dependent" in text or "data dependent" in text or "GuardOnDataDependent" in text:
        return (
            "Python control flow on a tensor's value cannot be traced into one graph; "
            "use torch.where / torch.cond, or move the decision out of forward()"
        )
    return ""
