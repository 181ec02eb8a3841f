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


@pytest.fixture(scope="module")
def client(served):
    """An HTTP client on the module's Serve app (each serving test module defines `served`: (url, ...))."""
    import httpx

    with httpx.Client(base_url=served[0], timeout=30) as c:
        yield c
