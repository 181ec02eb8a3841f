"""Shared pytest fixtures (helpers live in tests/support.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support import write_mirror


def pytest_configure(config: pytest.Config) -> None:
    """Token auth off for every Ray the tests start on loopback, before anything imports ray.

    Ray 2.60 fixes the driver's auth mode at its first import (`disabled` unless RAY_AUTH_MODE says otherwise) but
    starts a head in token mode when ~/.ray/auth_token exists: a head that `ray.init` starts in this process then
    refuses its own driver ("InvalidAuthToken"; seen for test_loop and test_shadow after the cluster tests on a
    machine with that file). Saying `disabled` here makes both sides agree; a test that wants token auth
    (test_serve_deploy) sets it for its own cluster and restores this.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


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
