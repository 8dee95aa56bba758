"""Exceptions that carry the graph context a person needs to act on them.

User mistakes (bad arguments, bad config) are plain ValueError/TypeError.
Everything that goes wrong in or about a graph is a ShardfxError, which
knows the node and the user's source line when there is one.
"""

from __future__ import annotations

import torch.fx as fx


def node_source(node: fx.Node | None) -> str:
    """The user's source line a node came from ('' when torch did not record one)."""
    if node is None:
        return ""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    # stack_trace is innermost-last: 'File "x.py", line N, in f' then the code line.
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File ") and "/torch/" not in lines[i]:
            code = lines[i + 1] if i + 1 < len(lines) else ""
            return f"{lines[i]}: {code}"
    return ""


class ShardfxError(Exception):
    """A problem with a graph: unsupported op, failed pass, failed verification."""

    def __init__(self, message: str, node: fx.Node | None = None) -> None:
        self.node = node
        parts = [message]
        if node is not None:
            parts.append(f"  node: {node.format_node()}")
            module = node.meta.get("shardfx.module")
            if module:
                parts.append(f"  module: {module}")
            source = node_source(node)
            if source:
                parts.append(f"  source: {source}")
        super().__init__("\n".join(parts))


class TraceError(ShardfxError):
    """The model could not be captured into one graph."""


class VerificationError(ShardfxError):
    """A program broke an invariant of the IR."""


class PassError(ShardfxError):
    """A pass failed; the message names the pass and the passes before it."""


class CheckpointError(ShardfxError, ValueError):
    """A checkpoint that cannot be loaded: missing, malformed, or holding what a checkpoint never holds."""


class ExecutionError(ShardfxError, RuntimeError):
    """A node of a compiled program raised while it ran (e.g. a token id past the embedding): names the node."""


class CollectiveError(ShardfxError, RuntimeError):
    """Ranks disagreed on a collective, or a rank failed or timed out inside one."""
