"""Fixtures of the tool tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tools import factories


@pytest.fixture
def user_factory_file(tmp_path: Path) -> Path:
    """tests/tools/factories.py copied to a file of the user's, outside any package."""
    path = tmp_path / "user_models.py"
    path.write_text(Path(factories.__file__).read_text())
    return path
