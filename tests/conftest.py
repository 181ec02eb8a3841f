"""Shared pytest fixtures (helpers live in tests/support.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import write_mirror


@pytest.fixture
def mirror(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A fixture data mirror and its files' sha256."""
    root = tmp_path / "mirror"
    return root, write_mirror(root)
