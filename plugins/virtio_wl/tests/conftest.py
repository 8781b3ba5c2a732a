"""Fixtures for the virtio-wl tests: a headless weston per test module."""

from __future__ import annotations

import pytest
from wl_rig import WESTON, Weston


@pytest.fixture(scope="module")
def weston():
    """A running headless weston (skips when weston is not installed)."""
    if WESTON is None:
        pytest.skip("weston is not installed (apt-get install -y weston)")
    w = Weston()
    yield w
    w.stop()
