"""A readable diff of two stages of one program: nodes added, removed, moved and changed.

Nodes keep their names from pass to pass (a pass adds new nodes, it does not
rename old ones), so two stages are matched by node name:
  added    in the later stage only (listed by the pass that made them: meta origin)
  removed  in the earlier stage only
  moved    in both, but out of the longest common order of the shared nodes
  changed  in both, printed differently (rewired inputs, new shape, placement)

Printed as `+` added, `-` removed, `~` moved, and `<` before / `>` after for a change.
"""

from __future__ import annotations

import difflib
import textwrap
from collections import defaultdict
from dataclasses import dataclass

import torch.fx as fx

from shardfx.graphs import meta
from shardfx.graphs.format import format_node
from shardfx.graphs.program import DistProgram


@dataclass
class ProgramDiff:
    added: list[fx.Node]
    removed: list[fx.Node]
    moved: list[tuple[fx.Node, fx.Node]]  # (before, after) of the same node name
    changed: list[tuple[fx.Node, fx.Node]]

    def summary(self) -> str:
        return (
            f"{len(self.added)} added, {len(self.removed)} removed, "
            f"{len(self.moved)} moved, {len(self.changed)} changed"
        )


def diff_programs(before: DistProgram, after: DistProgram) -> ProgramDiff:
    old = {n.name: n for n in before.graph.nodes}
    new = {n.name: n for n in after.graph.nodes}
    added = [n for name, n in new.items() if name not in old]
    removed = [n for name, n in old.items() if name not in new]
    common_old = [name for name in old if name in new]
    common_new = [name for name in new if name in old]
    in_order: set[str] = set()
    matcher = difflib.SequenceMatcher(None, common_old, common_new, autojunk=False)
    for block in matcher.get_matching_blocks():
        in_order.update(common_old[block.a : block.a + block.size])
    moved = [(old[name], new[name]) for name in common_new if name not in in_order]
    changed = [(old[name], new[name]) for name in common_new if format_node(old[name]) != format_node(new[name])]
    return ProgramDiff(added, removed, moved, changed)


def format_diff(d: ProgramDiff, name_before: str, name_after: str, width: int = 80) -> str:
    """The diff as text, each node line wrapped to `width` columns (0: no wrapping)."""
    lines = [f"# {name_before} -> {name_after}: {d.summary()}"]
    by_origin: dict[str, list[fx.Node]] = defaultdict(list)
    for node in d.added:
        by_origin[node.meta.get(meta.ORIGIN, "?")].append(node)
    for origin, nodes in by_origin.items():
        lines.append(f"## added by {origin} ({len(nodes)})")
        lines.extend(wrap_line(f"+ {format_node(n)}", width) for n in nodes)
    if d.removed:
        lines.append(f"## removed ({len(d.removed)})")
        lines.extend(wrap_line(f"- {format_node(n)}", width) for n in d.removed)
    if d.moved:
        lines.append(f"## moved ({len(d.moved)})")
        for old, new in d.moved:
            where = f"now after %{_prev(new)}, was after %{_prev(old)}"
            lines.append(wrap_line(f"~ %{new.name} ({new.meta.get(meta.ORIGIN, '?')}): {where}", width))
    if d.changed:
        lines.append(f"## changed ({len(d.changed)})")
        for old, new in d.changed:
            lines.append(wrap_line(f"< {format_node(old)}", width))
            lines.append(wrap_line(f"> {format_node(new)}", width))
    return "\n".join(lines) + "\n"


def _prev(node: fx.Node) -> str:
    prev = node.prev
    return prev.name if prev.op != "root" else "(start)"


def wrap_line(line: str, width: int, indent: str = "      ") -> str:
    """Wrap a printed node to `width` columns, breaking between its columns (two spaces) where it can."""
    if width <= 0 or len(line) <= width:
        return line
    out: list[str] = []
    current = ""
    for column in line.split("  "):
        joined = f"{current}  {column}" if current else column
        if len(joined) <= width:
            current = joined
            continue
        if current:
            out.append(current)
        pieces = textwrap.wrap(column, width - len(indent), break_on_hyphens=False) or [""]
        out.extend(indent + p for p in pieces[:-1])
        current = indent + pieces[-1]
    out.append(current)
    out[0] = out[0].lstrip() if not line.startswith(" ") else out[0]
    return "\n".join(out)
