"""Fixtures of the end-to-end tier (pytest -m e2e).

Every test in tests/e2e gets the ``e2e`` marker. Missing host tools (scripts/e2e-setup
installs them) skip the tier with that reason, except under CI (``CI`` set) or with
``VMM_E2E_REQUIRE=1``, where they fail it: a CI run must not go green by skipping.
Each test's timings (``e2e_timing(name, seconds)``) are printed in the terminal summary.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import images  # noqa: E402

_HERE = Path(__file__).resolve().parent
_timings: list[tuple[str, str, float]] = []


@pytest.hookimpl(tryfirst=True)   # before -m selection looks at the markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(_HERE):
            item.add_marker(pytest.mark.e2e)


def _required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("VMM_E2E_REQUIRE") == "1"


@pytest.fixture(scope="session")
def e2e_kernel() -> images.Kernel:
    """Debian's stock kernel, unpacked in the cache (downloaded on first use)."""
    missing = harness.missing_tools()
    if missing:
        msg = f"e2e needs {' '.join(missing)}: run scripts/e2e-setup"
        if _required():
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        return images.fetch_kernel()
    except Exception as e:  # no network and no cache: not this tier's bug
        if _required():
            raise
        pytest.skip(f"cannot fetch Debian's kernel: {e}")


@pytest.fixture(scope="session")
def level1(e2e_kernel) -> tuple[Path, Path]:
    """(kernel, initramfs) of the level-1 host, built once per session."""
    return harness.level1_images()


@pytest.fixture(scope="session")
def vmm_can_boot_linux() -> None:
    """Skip while `vmm run` cannot boot a stock kernel (see harness.vmm_linux_boot_missing)."""
    why = harness.vmm_linux_boot_missing()
    if why:
        pytest.skip(f"vmm cannot boot Linux yet ({why})")


@pytest.fixture
def e2e_timing(request):
    """Call ``e2e_timing(label, seconds)`` to report a timing in the summary."""

    def record(label: str, seconds: float) -> None:
        _timings.append((request.node.nodeid, label, seconds))
        request.node.user_properties.append((f"time:{label}", round(seconds, 2)))
        print(f"[e2e timing] {request.node.name}: {label} {seconds:.2f} s")

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _timings:
        return
    terminalreporter.section("e2e timings")
    for nodeid, label, seconds in _timings:
        terminalreporter.write_line(f"{seconds:7.2f} s  {label:<28} {nodeid}")
