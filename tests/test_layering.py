"""Data moves one way (docs/DESIGN.md section 1): graphs knows nothing of passes or the runtime, and the
runtime runs any valid program without importing a pass."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "shardfx"


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (function-level imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize(
    "layer, forbidden",
    [
        ("runtime", ("shardfx.passes", "shardfx.driver", "shardfx.tools", "shardfx.api")),
        ("graphs", ("shardfx.passes", "shardfx.runtime", "shardfx.driver", "shardfx.tools", "shardfx.api")),
    ],
)
def test_layer_imports_nothing_above_it(layer: str, forbidden: tuple[str, ...]) -> None:
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files
    bad = {
        str(f.relative_to(PACKAGE)): sorted(m for m in imports(f) if m.startswith(forbidden))
        for f in files
        if any(m.startswith(forbidden) for m in imports(f))
    }
    assert bad == {}


def test_the_check_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from shardfx.passes import pipeline\n")
    assert "shardfx.passes" in imports(f)
